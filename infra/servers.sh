#!/usr/bin/env bash
# Real servers for the distributed-mode tests: Redis (Debian), Apache Kafka 4.4 (KRaft, one
# node) and Apache Cassandra 5.0 (one node), both from Maven Central, and SeaweedFS (its S3
# gateway, built from the Go module proxy) for media. Everything slow to fetch or build is
# cached under .cache/servers/ (git-ignored) and reused by later runs.
#
#   infra/servers.sh fetch                      install / download what is missing
#   infra/servers.sh run <redis|redis-cluster|kafka|cassandra|s3> <dir> <port>
#                                               run one server in the foreground (tests use
#                                               this to own, kill and restart a server)
#   infra/servers.sh wait <redis|kafka|cassandra|s3> <port> [seconds]
#                                               wait until the server answers a real request
#   infra/servers.sh up <state-dir>             start all four on free loopback ports, wait
#                                               for them, write <state-dir>/servers.env
#                                               (TEST_* names, for the tests) and
#                                               <state-dir>/backends.env (the names the
#                                               binaries read)
#   infra/servers.sh up-replicated <state-dir>  3 Kafka brokers (KRaft, 3 voters) on 127.0.0.1,
#                                               3 Cassandra nodes on 127.0.0.1/.2/.3 (one
#                                               after the other), a Redis Cluster of 3
#                                               masters; the same servers.env, plus
#                                               TEST_REPLICATION=3
#   infra/servers.sh up-secure <state-dir>      Redis, Kafka and Cassandra that require
#                                               credentials and TLS (a CA and a server
#                                               certificate made in <state-dir>/tls): Redis
#                                               with an ACL user on a TLS port, Kafka with
#                                               SASL/SCRAM-SHA-256 over TLS, Cassandra with
#                                               PasswordAuthenticator and client encryption;
#                                               servers.env carries the credentials too
#   infra/servers.sh down <state-dir>           stop what `up` started
#
# An `up` over a state dir whose servers still run is refused; one whose server exits or
# does not answer stops the others it started and fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/.cache/servers"
KAFKA_VERSION=4.4.0
CASSANDRA_VERSION=5.0.9
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
CASSANDRA_LIBS="$CACHE/cassandra-$CASSANDRA_VERSION/libs"
# SeaweedFS publishes no tagged Go module versions: this is the pseudo-version of its
# 2026-11-09 main (the module proxy serves it).
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
WEED="$CACHE/seaweedfs-$SEAWEEDFS_VERSION/weed"
# The S3 server's test bucket and credentials (loopback only, test data only).
S3_BUCKET=chat-media
S3_ACCESS_KEY=chat-test
S3_SECRET_KEY=chat-test-secret-key

log() { echo "servers: $*" >&2; }

fetch_maven() { # <pom dir> <libs dir>
    local pom="$ROOT/infra/servers/$1/pom.xml" libs="$2" sum
    # The marker holds the pom's checksum: a changed pom fetches again.
    sum="$(sha256sum "$pom" | cut -c1-64)"
    if [ "$(cat "$libs/.complete" 2>/dev/null)" = "$sum" ]; then return; fi
    log "fetching $1 jars from Maven Central into $libs"
    rm -rf "$libs"
    mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$libs" >&2
    echo "$sum" > "$libs/.complete"
}

fetch() {
    if ! command -v redis-server >/dev/null; then
        log "installing redis-server with apt"
        "$ROOT/infra/apt-install.sh" redis-server
    fi
    command -v java >/dev/null || { log "java is required (Java 17)"; exit 1; }
    command -v mvn >/dev/null || { log "mvn is required to fetch Kafka and Cassandra"; exit 1; }
    fetch_maven kafka "$KAFKA_LIBS"
    fetch_maven cassandra "$CASSANDRA_LIBS"
    if [ ! -x "$WEED" ]; then
        command -v go >/dev/null || { log "go is required to build SeaweedFS"; exit 1; }
        log "building SeaweedFS $SEAWEEDFS_VERSION (weed) into $(dirname "$WEED"): a few minutes, once"
        # `go install module@version` refuses a module whose go.mod has replace directives,
        # so weed is built from a module of our own that requires it, with its one replace.
        local src
        src="$(dirname "$WEED")/src"
        rm -rf "$src" && mkdir -p "$src"
        (
            cd "$src"
            go mod init chat-test-servers/weed >&2
            go mod edit -replace github.com/tyler-smith/go-bip39=github.com/cosmos/go-bip39@v1.0.0
            go get "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" >&2
            GOFLAGS=-mod=mod go build -o "$WEED.partial" github.com/seaweedfs/seaweedfs/weed >&2
        )
        mv "$WEED.partial" "$WEED"
    fi
}

# A free loopback port. The kernel may hand a port out again once it is released, and a
# server chosen a port for has not always bound it yet, so the ports given out to one set
# of servers are remembered in the file CHAT_SERVERS_PORTS names (set by `up*` and `run`)
# and never given out twice.
free_port() {
    python3 - "${CHAT_SERVERS_PORTS:-}" <<'PY'
import fcntl, socket, sys
given, held, memory = set(), [], None
if sys.argv[1]:
    memory = open(sys.argv[1], "a+")
    fcntl.flock(memory, fcntl.LOCK_EX)
    memory.seek(0)
    given = {int(port) for port in memory.read().split()}
while True:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    held.append(listener)  # held until the end, so that the kernel offers another
    port = listener.getsockname()[1]
    if port not in given:
        break
if memory:
    memory.write(f"{port}\n")
    memory.flush()
print(port)
PY
}

run_redis() { # <dir> <port>
    mkdir -p "$1"
    exec redis-server --bind 127.0.0.1 --port "$2" --dir "$1" --save '' --appendonly no \
        --notify-keyspace-events Ex --protected-mode no --loglevel warning
}

run_redis_cluster() { # <dir> <port>: a node of a Redis Cluster
    mkdir -p "$1"
    # The cluster bus gets a port of its own (by default the port + 10,000, out of range
    # for a high port), kept across restarts.
    [ -f "$1/bus-port" ] || free_port > "$1/bus-port"
    exec redis-server --bind 127.0.0.1 --port "$2" --dir "$1" --save '' --appendonly no \
        --cluster-enabled yes --cluster-config-file "$1/nodes.conf" \
        --cluster-port "$(cat "$1/bus-port")" \
        --notify-keyspace-events Ex --protected-mode no --loglevel warning
}

run_kafka() { # <dir> <port>; with KAFKA_SECURE set (run kafka-secure), SASL/SCRAM over TLS
    local dir="$1" port="$2" controller internal format=()
    mkdir -p "$dir"
    if [ ! -f "$dir/server.properties" ]; then
        controller="$(free_port)"
        if [ -z "${KAFKA_SECURE:-}" ]; then
            cat > "$dir/server.properties" <<PROPS
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
PROPS
        else
            # Clients get SASL/SCRAM over TLS on <port>; the controller and the broker's
            # own listener (INTERNAL, which `wait` asks) stay plain on loopback.
            internal="$(free_port)"
            echo "$internal" > "$dir/internal-port"
            cat > "$dir/server.properties" <<PROPS
listeners=SASL_SSL://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal,CONTROLLER://127.0.0.1:$controller
advertised.listeners=SASL_SSL://127.0.0.1:$port,INTERNAL://127.0.0.1:$internal
listener.security.protocol.map=SASL_SSL:SASL_SSL,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=INTERNAL
sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$CHAT_SERVERS_TLS/server-bundle.pem
PROPS
            format=(--add-scram "SCRAM-SHA-256=[name=$SECURE_USER,password=$SECURE_PASSWORD]")
        fi
        cat >> "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$controller
controller.listener.names=CONTROLLER
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
        java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format --standalone \
            -t "$(java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null)" \
            "${format[@]}" -c "$dir/server.properties" >&2
    fi
    exec java -Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$ROOT/infra/servers/kafka/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties"
}

run_cassandra() { # <dir> <port>
    local dir="$1" port="$2" storage
    # A node of a replicated cluster finds its address, token and heap in its directory.
    local address=127.0.0.1 token=0 heap=2g seed="" num_tokens=16 bootstrap=true
    storage=""
    # shellcheck disable=SC1091
    [ -f "$dir/node.env" ] && . "$dir/node.env"
    mkdir -p "$dir"
    if [ ! -f "$dir/cassandra.yaml" ]; then
        [ -n "$storage" ] || storage="$(free_port)"
        cat > "$dir/cassandra.yaml" <<YAML
cluster_name: chat-test
num_tokens: $num_tokens
auto_bootstrap: $bootstrap
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "${seed:-$address}:$storage"
listen_address: $address
rpc_address: $address
storage_port: $storage
native_transport_port: $port
start_native_transport: true
data_file_directories: [$dir/data]
commitlog_directory: $dir/commitlog
saved_caches_directory: $dir/saved_caches
hints_directory: $dir/hints
commitlog_sync: periodic
commitlog_sync_period: 10000ms
authenticator: ${CASSANDRA_AUTHENTICATOR:-AllowAllAuthenticator}
authorizer: AllowAllAuthorizer
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
key_cache_size: 8MiB
disk_access_mode: mmap_index_only
auto_snapshot: false
# The dispatchers write in unlogged batches that span partitions on purpose (one request
# carries many writes); the default threshold of 10 would warn on every one.
unlogged_batch_across_partitions_warn_threshold: 1000
batch_size_warn_threshold: 64KiB
# Every test prepares the store's ~45 statements in a keyspace of its own, so one node sees
# thousands of them in a run. The default cache (10 MiB with this heap) filled after about
# 150 test clusters, and from then on a statement prepared for a new keyspace was not
# admitted: its execute came back "not prepared" even after the driver prepared it again,
# and every later cluster failed to start (reproduced with 1 MiB after 14). A production
# node has one keyspace and needs none of this.
prepared_statements_cache_size: 256MiB
${CASSANDRA_EXTRA:-}
YAML
    fi
    local opts=(
        "-Xms$heap" "-Xmx$heap" -XX:+UseG1GC -Xss512k
        -Dcassandra.config="file://$dir/cassandra.yaml"
        -Dcassandra.storagedir="$dir"
        -Dcassandra-foreground=yes
        -Dcassandra.skip_wait_for_gossip_to_settle=0
        -Dcassandra.ring_delay_ms=0
        "-Dcassandra.initial_token=$token"
        -Dcassandra.jmx.local.port=0
        ${CASSANDRA_JVM_EXTRA:-}
        -Dlogback.configurationFile=logback-none.xml
        -Djdk.attach.allowAttachSelf=true
        --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
        --add-exports java.base/jdk.internal.ref=ALL-UNNAMED
        --add-exports java.base/sun.nio.ch=ALL-UNNAMED
        --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
        --add-exports java.sql/java.sql=ALL-UNNAMED
        --add-exports java.base/java.lang.ref=ALL-UNNAMED
        --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
        --add-opens java.base/java.lang.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
        --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
        --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
        --add-opens java.base/jdk.internal.math=ALL-UNNAMED
        --add-opens java.base/jdk.internal.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
        --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
        --add-opens java.base/sun.nio.ch=ALL-UNNAMED
        --add-opens java.base/java.io=ALL-UNNAMED
        --add-opens java.base/java.nio=ALL-UNNAMED
        --add-opens java.base/java.util.concurrent=ALL-UNNAMED
        --add-opens java.base/java.util=ALL-UNNAMED
        --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED
        --add-opens java.base/java.lang=ALL-UNNAMED
        --add-opens java.base/java.math=ALL-UNNAMED
        --add-opens java.base/java.lang.reflect=ALL-UNNAMED
        --add-opens java.base/java.net=ALL-UNNAMED
        --add-opens java.base/java.lang.invoke=ALL-UNNAMED
    )
    exec java "${opts[@]}" -cp "$CASSANDRA_LIBS/*" org.apache.cassandra.service.CassandraDaemon
}

# SeaweedFS in one process (`weed mini`: master, volume server, filer, S3 gateway) with one
# identity and the test bucket; its other ports are free ones too.
run_s3() { # <dir> <port>
    local dir="$1" port="$2"
    mkdir -p "$dir/data"
    cat > "$dir/s3.json" <<JSON
{"identities": [{"name": "chat", "credentials": [{"accessKey": "$S3_ACCESS_KEY",
  "secretKey": "$S3_SECRET_KEY"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
    exec "$WEED" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -s3.port="$port" -s3.port.grpc="$(free_port)" -s3.config="$dir/s3.json" \
        -s3.port.iceberg=0 -s3.port.lance=0 -bucket="$S3_BUCKET" \
        -master.port="$(free_port)" -master.port.grpc="$(free_port)" \
        -volume.port="$(free_port)" -volume.port.grpc="$(free_port)" \
        -filer.port="$(free_port)" -filer.port.grpc="$(free_port)" \
        -webdav=false -admin.ui=false -master.telemetry=false
}

# Waits until the server answers a real request, not merely until its port is open.
# Given the server's pid, it gives up as soon as the process has exited.
wait_for() { # <kind> <port> [seconds] [host] [pid]
    local kind="$1" port="$2" deadline=$((SECONDS + ${3:-180})) pid="${5:-}"
    until answers "$kind" "$port" "${4:-127.0.0.1}"; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            log "$kind (pid $pid) exited before answering on port $port"
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            log "$kind on port $port did not answer in time"
            return 1
        fi
        sleep 0.5
    done
}

answers() { # <kind> <port> [host]
    local host="${3:-127.0.0.1}"
    case "$1" in
    redis) [ "$(redis-cli -h 127.0.0.1 -p "$2" ping 2>/dev/null)" = PONG ] ;;
    kafka) python3 - "$2" <<'PY'
import socket, struct, sys
# A Kafka Metadata request (v1, all topics); the broker is ready once it lists itself.
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
    client = b"servers.sh"
    body = struct.pack(">hhih", 3, 1, 7, len(client)) + client + struct.pack(">i", -1)
    s.sendall(struct.pack(">i", len(body)) + body)
    size = struct.unpack(">i", s.recv(4))[0]
    data = b""
    while len(data) < size:
        chunk = s.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    correlation, brokers = struct.unpack(">ii", data[:8])
    sys.exit(0 if correlation == 7 and brokers >= 1 else 1)
except (OSError, struct.error):
    sys.exit(1)
PY
    ;;
    cassandra) python3 - "$2" "$host" <<'PY'
import socket, struct, sys
# A CQL OPTIONS request (protocol v4); a running node answers SUPPORTED (opcode 6).
try:
    s = socket.create_connection((sys.argv[2], int(sys.argv[1])), timeout=2)
    s.sendall(struct.pack(">BBhBi", 4, 0, 0, 5, 0))
    head = s.recv(9)
    sys.exit(0 if len(head) == 9 and head[4] == 6 else 1)
except OSError:
    sys.exit(1)
PY
    ;;
    redis-secure)
        [ "$(redis-cli --tls --cacert "$CHAT_SERVERS_TLS/ca.pem" -h localhost -p "$2" \
            --user "$SECURE_USER" --pass "$SECURE_PASSWORD" --no-auth-warning ping 2>/dev/null)" = PONG ] ;;
    kafka-secure) # Its plain inter-broker listener, on loopback.
        answers kafka "$(cat "$CHAT_SERVERS_STATE/kafka/internal-port" 2>/dev/null || echo 1)" ;;
    cassandra-secure | cassandra-login) python3 - "$2" "$1" "$CHAT_SERVERS_TLS/ca.pem" <<'PY'
import socket, ssl, struct, sys
# Over TLS: OPTIONS (a running node answers SUPPORTED); for cassandra-login, then STARTUP
# and the superuser's PLAIN login (AUTH_SUCCESS, opcode 0x10, once the role exists).
port, kind, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def frame(op, body=b"", stream=0):
    return struct.pack(">BBhBi", 4, 0, stream, op, len(body)) + body
def read(s):
    head = b""
    while len(head) < 9:
        chunk = s.recv(9 - len(head))
        if not chunk:
            raise OSError("closed")
        head += chunk
    size = struct.unpack(">i", head[5:9])[0]
    body = b""
    while len(body) < size:
        chunk = s.recv(size - len(body))
        if not chunk:
            raise OSError("closed")
        body += chunk
    return head[4], body
try:
    context = ssl.create_default_context(cafile=ca)
    s = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=2),
                            server_hostname="localhost")
    s.sendall(frame(5))
    if read(s)[0] != 6:
        sys.exit(1)
    if kind == "cassandra-login":
        options = {b"CQL_VERSION": b"3.0.0"}
        body = struct.pack(">H", len(options)) + b"".join(
            struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v for k, v in options.items())
        s.sendall(frame(1, body))
        if read(s)[0] != 3:  # AUTHENTICATE
            sys.exit(1)
        token = b"\0cassandra\0cassandra"
        s.sendall(frame(0x0F, struct.pack(">i", len(token)) + token))
        sys.exit(0 if read(s)[0] == 0x10 else 1)
    sys.exit(0)
except (OSError, struct.error, ssl.SSLError):
    sys.exit(1)
PY
    ;;
    s3) # A signed write to the test bucket, then its removal: the bucket exists (it is
        # created after the rest is up), and the first write of a fresh server, which grows
        # its volumes (0.2 s idle, seconds on a busy machine), is behind us.
        local url="http://127.0.0.1:$2/$S3_BUCKET/.ready" sign=(--aws-sigv4 "aws:amz:us-east-1:s3"
            --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")
        [ "$(curl -s -o /dev/null -w '%{http_code}' "${sign[@]}" -X PUT --data-binary ready "$url")" = 200 ] &&
            curl -s -o /dev/null "${sign[@]}" -X DELETE "$url" ;;
    *) log "unknown server kind $1"; return 2 ;;
    esac
}

# A state dir whose servers still run is refused: starting over it would lose their pids,
# and `down` could no longer stop them.
refuse_live() { # <state dir>
    local state="$1" pid kind
    [ -f "$state/pids" ] || return 0
    while read -r pid kind _; do
        if kill -0 "$pid" 2>/dev/null; then
            log "$state has a running $kind (pid $pid): run \`$0 down $state\` first"
            return 1
        fi
    done < "$state/pids"
}

# Runs one of the `up` functions: refuses a state dir whose servers still run, and stops
# whatever was started if the start fails (the script exits non-zero, or is killed).
start() { # <up function> <state dir>
    refuse_live "$2"
    STARTING="$2"
    export CHAT_SERVERS_PORTS="$2/ports"
    mkdir -p "$2" && : > "$CHAT_SERVERS_PORTS"
    trap '[ $? -eq 0 ] || down "$STARTING"' EXIT
    "$1" "$2"
}

up() { # <state dir>
    local state="$1" kind port
    mkdir -p "$state"
    : > "$state/pids"
    for kind in redis kafka cassandra s3; do
        port="$(free_port)"
        "$0" run "$kind" "$state/$kind" "$port" > "$state/$kind.log" 2>&1 &
        echo "$! $kind $port" >> "$state/pids"
        log "started $kind on 127.0.0.1:$port (pid $!, log $state/$kind.log)"
    done
    while read -r pid kind port _; do
        if ! wait_for "$kind" "$port" 240 127.0.0.1 "$pid"; then
            tail -n 40 "$state/$kind.log" >&2 || true
            return 1
        fi
        log "$kind answers on port $port"
        case "$kind" in
        redis) echo "TEST_REDIS_URL=redis://127.0.0.1:$port" ;;
        kafka) echo "TEST_KAFKA_BROKERS=127.0.0.1:$port" ;;
        cassandra) echo "TEST_SCYLLA_NODES=127.0.0.1:$port" ;;
        s3) s3_env "$port" ;;
        esac
    done < "$state/pids" > "$state/servers.env"
    backends_env "$state"
}

s3_env() { # <port>
    echo "TEST_S3_ENDPOINT=http://127.0.0.1:$1"
    echo "TEST_S3_BUCKET=$S3_BUCKET"
    echo "TEST_S3_ACCESS_KEY_ID=$S3_ACCESS_KEY"
    echo "TEST_S3_SECRET_ACCESS_KEY=$S3_SECRET_KEY"
}

# <state-dir>/backends.env: the same addresses under the names the binaries read, for
# `set -a; . <state-dir>/backends.env; set +a` before starting gateways and dispatchers by
# hand. (The tests source servers.env: with these names set, a gateway they start as a
# process would leave the embedded mode.)
backends_env() { # <state dir>
    local state="$1"
    sed -e 's/^TEST_REDIS_URL=/REDIS_URL=/' -e 's/^TEST_KAFKA_BROKERS=/KAFKA_BROKERS=/' \
        -e 's/^TEST_SCYLLA_NODES=/SCYLLA_NODES=/' -e 's/^TEST_REPLICATION=\(.*\)/KAFKA_REPLICATION=\1\nSCYLLA_REPLICATION=\1/' \
        -e 's/^TEST_S3_ENDPOINT=/S3_ENDPOINT=/' -e 's/^TEST_S3_BUCKET=/S3_BUCKET=/' \
        -e 's/^TEST_S3_ACCESS_KEY_ID=/AWS_ACCESS_KEY_ID=/' -e 's/^TEST_S3_SECRET_ACCESS_KEY=/AWS_SECRET_ACCESS_KEY=/' \
        -e '/^TEST_/d' "$state/servers.env" > "$state/backends.env"
}

# Kafka node <n> of three (combined broker and controller, static voters), its
# server.properties and formatted log dir; run by `run kafka` like a single node.
prepare_kafka_node() { # <dir> <n> <port> <voters> <cluster id>
    local dir="$1" n="$2" port="$3" voters="$4" id="$5" controller
    controller="$(echo "$voters" | tr ',' '\n' | sed -n "${n}p" | sed 's/.*://')"
    mkdir -p "$dir"
    cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=3
min.insync.replicas=2
auto.create.topics.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
replica.lag.time.max.ms=10000
PROPS
    java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format -t "$id" \
        -c "$dir/server.properties" >&2
}

# Three Kafka brokers and three Cassandra nodes (each line of <state>/pids names the
# node's directory, so a test can kill one and start it again with `run`), one Redis.
up_replicated() { # <state dir>
    local state="$1" i port id voters="" kafka_ports=() pid
    mkdir -p "$state"
    : > "$state/pids"
    # A Redis Cluster of three masters (no replicas: a lost master's slots are down
    # until it is back).
    local redis_ports=()
    for i in 1 2 3; do
        port="$(free_port)"
        redis_ports+=("$port")
        "$0" run redis-cluster "$state/redis$i" "$port" > "$state/redis$i.log" 2>&1 &
        echo "$! redis-cluster $port $state/redis$i" >> "$state/pids"
    done
    for port in "${redis_ports[@]}"; do wait_for redis "$port" 60; done
    redis-cli --cluster create "${redis_ports[@]/#/127.0.0.1:}" --cluster-replicas 0 \
        --cluster-yes > "$state/redis-cluster.log" 2>&1
    local deadline=$((SECONDS + 60))
    until redis-cli -p "${redis_ports[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; do
        [ $SECONDS -lt $deadline ] || { log "the Redis Cluster did not form"; cat "$state/redis-cluster.log" >&2; return 1; }
        sleep 0.5
    done
    log "redis cluster of 3 masters on ports ${redis_ports[*]}"
    for i in 1 2 3; do
        voters="$voters${voters:+,}$i@127.0.0.1:$(free_port)"
        kafka_ports+=("$(free_port)")
    done
    id="$(java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null)"
    for i in 1 2 3; do
        prepare_kafka_node "$state/kafka$i" "$i" "${kafka_ports[$((i - 1))]}" "$voters" "$id"
        "$0" run kafka "$state/kafka$i" "${kafka_ports[$((i - 1))]}" > "$state/kafka$i.log" 2>&1 &
        echo "$! kafka ${kafka_ports[$((i - 1))]} $state/kafka$i" >> "$state/pids"
        log "started kafka node $i on 127.0.0.1:${kafka_ports[$((i - 1))]} (pid $!)"
    done
    # Cassandra nodes join one at a time: tokens spread evenly, one per node.
    port="$(free_port)"
    local tokens=(-9223372036854775808 -3074457345618258603 3074457345618258602)
    local storage
    storage="$(free_port)"
    for i in 1 2 3; do
        mkdir -p "$state/cassandra$i"
        # The same ports on every node (each has its own address); node 1 is the seed.
        printf 'address=127.0.0.%s\ntoken=%s\nheap=768m\nstorage=%s\nseed=127.0.0.1\nnum_tokens=1\nbootstrap=false\n' \
            "$i" "${tokens[$((i - 1))]}" "$storage" > "$state/cassandra$i/node.env"
        "$0" run cassandra "$state/cassandra$i" "$port" > "$state/cassandra$i.log" 2>&1 &
        pid=$!
        echo "$pid cassandra $port $state/cassandra$i 127.0.0.$i" >> "$state/pids"
        log "started cassandra node $i on 127.0.0.$i:$port (pid $pid)"
        if ! wait_for cassandra "$port" 300 "127.0.0.$i"; then
            tail -n 40 "$state/cassandra$i.log" >&2 || true
            return 1
        fi
        log "cassandra node $i answers"
    done
    for port in "${kafka_ports[@]}"; do
        wait_for kafka "$port" 240 || { tail -n 40 "$state"/kafka*.log >&2; return 1; }
    done
    log "replicated servers answer"
    {
        # Quoted: the file is sourced by a shell, and the URL has an `&`.
        echo "TEST_REDIS_URL='redis-cluster://127.0.0.1:${redis_ports[0]}?node=127.0.0.1:${redis_ports[1]}&node=127.0.0.1:${redis_ports[2]}'"
        echo "TEST_KAFKA_BROKERS=$(IFS=,; echo "${kafka_ports[*]/#/127.0.0.1:}")"
        echo "TEST_SCYLLA_NODES=$(awk '$2 == "cassandra" {printf "%s%s:%s", sep, $5, $3; sep=","}' "$state/pids")"
        echo "TEST_REPLICATION=3"
        echo "TEST_SERVERS_STATE=$state"
    } > "$state/servers.env"
    backends_env "$state"
}

down() { # <state dir>
    local state="$1" pid kind port
    [ -f "$state/pids" ] || return 0
    while read -r pid _; do
        kill "$pid" 2>/dev/null || true
    done < "$state/pids"
    sleep 1
    while read -r pid _; do
        kill -9 "$pid" 2>/dev/null || true
    done < "$state/pids"
    rm -f "$state/pids"
}

# The secure servers' credentials (loopback only, test data only). Cassandra's is the
# superuser it creates on first start.
SECURE_USER=chat
SECURE_PASSWORD=chat-test-password

make_certificates() { # <dir>: a CA, and a server certificate for localhost and 127.0.0.1
    local dir="$1"
    mkdir -p "$dir"
    (
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=chat-test-ca \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
            -keyout ca.key -out ca.pem 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
            -keyout server.key -out server.csr 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile server.ext -out server.pem 2>/dev/null
        # Kafka's and Cassandra's PEM key stores: the key, then the chain.
        cat server.key server.pem > server-bundle.pem
    )
}

run_redis_secure() { # <dir> <port>: TLS only, one ACL user, the default user off
    local tls="$CHAT_SERVERS_TLS"
    mkdir -p "$1"
    exec redis-server --bind 127.0.0.1 --port 0 --tls-port "$2" --dir "$1" --save '' \
        --appendonly no --tls-cert-file "$tls/server.pem" --tls-key-file "$tls/server.key" \
        --tls-ca-cert-file "$tls/ca.pem" --tls-auth-clients no \
        --user "$SECURE_USER" on ">$SECURE_PASSWORD" '~*' '&*' '+@all' --user default off \
        --notify-keyspace-events Ex --protected-mode no --loglevel warning
}

run_kafka_secure() { # <dir> <port>
    KAFKA_SECURE=1 run_kafka "$1" "$2"
}

run_cassandra_secure() { # <dir> <port>: passwords and client encryption required
    local tls="$CHAT_SERVERS_TLS"
    # The plain node's configuration, and what makes it secure.
    CASSANDRA_AUTHENTICATOR=PasswordAuthenticator
    CASSANDRA_EXTRA="client_encryption_options:
  enabled: true
  optional: false
  ssl_context_factory:
    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory
  keystore: $tls/server-bundle.pem"
    CASSANDRA_JVM_EXTRA=-Dcassandra.superuser_setup_delay_ms=0
    run_cassandra "$1" "$2"
}

up_secure() { # <state dir>
    local state="$1" kind port
    mkdir -p "$state"
    make_certificates "$state/tls"
    export CHAT_SERVERS_TLS="$state/tls" CHAT_SERVERS_STATE="$state"
    : > "$state/pids"
    for kind in redis kafka cassandra; do
        port="$(free_port)"
        "$0" run "$kind-secure" "$state/$kind" "$port" > "$state/$kind.log" 2>&1 &
        echo "$! $kind $port" >> "$state/pids"
        log "started $kind (credentials and TLS) on 127.0.0.1:$port (pid $!, log $state/$kind.log)"
    done
    while read -r pid kind port _; do
        if ! wait_for "$kind-secure" "$port" 240 127.0.0.1 "$pid"; then
            tail -n 40 "$state/$kind.log" >&2 || true
            return 1
        fi
        log "$kind answers on port $port"
    done < "$state/pids"
    # Cassandra answers before its superuser exists: wait for a login to work.
    wait_for cassandra-login "$(awk '$2 == "cassandra" {print $3}' "$state/pids")" 120 || return 1
    local tls="$state/tls"
    while read -r pid kind port _; do
        case "$kind" in
        redis)
            echo "TEST_REDIS_URL=rediss://localhost:$port"
            echo "TEST_REDIS_USERNAME=$SECURE_USER"
            echo "TEST_REDIS_PASSWORD=$SECURE_PASSWORD"
            echo "TEST_REDIS_CA_FILE=$tls/ca.pem" ;;
        kafka)
            echo "TEST_KAFKA_BROKERS=127.0.0.1:$port"
            echo "TEST_KAFKA_SECURITY_PROTOCOL=sasl-ssl"
            echo "TEST_KAFKA_SASL_MECHANISM=scram-sha-256"
            echo "TEST_KAFKA_USERNAME=$SECURE_USER"
            echo "TEST_KAFKA_PASSWORD=$SECURE_PASSWORD"
            echo "TEST_KAFKA_CA_FILE=$tls/ca.pem" ;;
        cassandra)
            # The password from a file, as a mounted secret would give it.
            printf cassandra > "$state/cassandra-password"
            echo "TEST_SCYLLA_NODES=127.0.0.1:$port"
            echo "TEST_SCYLLA_USERNAME=cassandra"
            echo "TEST_SCYLLA_PASSWORD_FILE=$state/cassandra-password"
            echo "TEST_SCYLLA_CA_FILE=$tls/ca.pem" ;;
        esac
    done < "$state/pids" > "$state/servers.env"
    echo "TEST_SECURE=1" >> "$state/servers.env"
}

cmd="${1:-}"
shift || true
case "$cmd" in
fetch) fetch ;;
run)
    # On its own (a test's server), the server's own port and those it picks are one set.
    if [ -z "${CHAT_SERVERS_PORTS:-}" ]; then
        export CHAT_SERVERS_PORTS="$2.ports"
        echo "$3" >> "$CHAT_SERVERS_PORTS"
    fi
    "run_${1//-/_}" "$2" "$3" ;;
wait) wait_for "$@" ;;
up) fetch; start up "$1" ;;
up-replicated) fetch; start up_replicated "$1" ;;
up-secure) fetch; start up_secure "$1" ;;
down) down "$1" ;;
*) sed -n '2,23p' "$0" >&2; exit 2 ;;
esac
