//! One WebSocket connection: its reader, its writer, and the replay of what it missed.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use presence::{Location, PresenceService};
use storage::MessageStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{interval_at, timeout, Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::fragments::TooManyFragments;
use tracing::Instrument;
use uuid::Uuid;

use crate::app::App;
use crate::hub::{Class, ConnHandle, Slot};
use crate::protocol::{Refusal, ServerFrame};
use crate::session::Session;

/// Pending messages read from the store per page during a replay.
const REPLAY_PAGE: usize = 100;
/// Frames written before one flush.
const MAX_WRITE_BATCH: usize = 64;
/// How long a closing connection may take to finish its last write and send the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How long, after its close frame, a connection reads and discards what the client still
/// sends while waiting for it to close its side (see `linger`).
const LINGER: Duration = Duration::from_secs(2);

/// The two halves of an upgraded connection.
pub type Halves<S> = (
    SplitSink<WebSocketStream<S>, WsMessage>,
    SplitStream<WebSocketStream<S>>,
);

/// Serves an upgraded connection until it closes. It takes the stream already split: the
/// future keeps room for what it is given for as long as it runs, and the halves are a few
/// words where the whole stream is hundreds of bytes — per connection, for its lifetime.
///
/// An `async move` block, not an `async fn`: an async fn keeps its arguments and moves
/// them into locals of its own, room for both in every idle connection's task; a block
/// uses what it captured in place.
///
/// `slot` is the user's connection slot on this node, held until the connection ends.
pub fn serve<S>(
    halves: Halves<S>,
    user: String,
    device: String,
    app: Arc<App>,
    slot: Slot,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = app.hub.next_conn_id();
    let span = tracing::info_span!("conn", %user, %device, conn = id);
    async move {
        // The handle owns the names from here on: what the future keeps of its own is
        // only room, not their allocations.
        let (conn, outbound) =
            ConnHandle::new(id, user, device, app.config.outbound_queue as usize);
        conn.heard(app.now_ms());
        // Queued before the connection is visible to anyone, so it is the first frame.
        conn.deliver(
            Utf8Bytes::from(
                ServerFrame::Welcome {
                    user: conn.user.clone(),
                    device: conn.device.clone(),
                    node: app.node.clone(),
                    heartbeat_s: app.config.heartbeat_secs,
                }
                .to_json(),
            ),
            Class::Reliable,
        );
        app.hub.register(&conn);
        metrics::gauge!("gateway_connections_active").increment(1);
        metrics::counter!("gateway_connections_total").increment(1);
        tracing::debug!("connected");

        // Boxed here and below: awaits that happen once per connection should not make the
        // task that lives as long as the connection any larger.
        if !Box::pin(locate(&conn, &app, true)).await {
            // Registered by the node's next heartbeat, and then caught up.
            app.unlocated.push(&conn);
        }

        let writer = tokio::spawn(
            write_loop(halves.0, outbound, conn.clone(), app.clone()).in_current_span(),
        );
        // The replay's end is signalled by dropping `replayed`, not by its JoinHandle: a task
        // whose handle is held stays allocated, at its future's size, until the handle goes.
        let (replayed, replay_done) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            {
                let (conn, app) = (conn.clone(), app.clone());
                async move {
                    replay(conn, app).await;
                    drop(replayed);
                }
            }
            .in_current_span(),
        );
        let stream = read_loop(halves.1, &conn, &app).await;
        conn.reader_stopped();
        // Whatever ended the reader, the writer and the replay end too.
        conn.close(CloseCode::Normal);
        let _ = replay_done.await;
        // Boxed, and given the halves rather than the reunited stream: a value moved out of a
        // local still has room kept for it in the future that awaits after the move, and the
        // whole stream is hundreds of bytes of every idle connection's task.
        Box::pin(linger(stream, writer)).await;

        app.hub.unregister(&conn);
        metrics::gauge!("gateway_connections_active").decrement(1);
        Box::pin(locate(&conn, &app, false)).await;
        tracing::debug!(close_code = ?conn.close_code(), "disconnected");
        // Held until here, then given back.
        drop(slot);
    }
    .instrument(span)
}

/// Tells presence that the connection's device is here (`connected`) or gone, within the
/// backend timeout; whether it worked (a failure is logged).
async fn locate(conn: &ConnHandle, app: &App, connected: bool) -> bool {
    let location = Location {
        node: app.node.clone(),
        device: conn.device.clone(),
        conn: conn.id,
    };
    let within = app.config.backend_timeout();
    let result = if connected {
        timeout(within, app.presence.connect(&conn.user, &location)).await
    } else {
        timeout(within, app.presence.disconnect(&conn.user, &location)).await
    };
    match result {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, connected, "presence update failed");
            false
        }
        Err(_) => {
            tracing::warn!(connected, "presence update timed out");
            false
        }
    }
}

/// Reads frames until the connection closes, and gives the stream back for `linger`.
async fn read_loop<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    conn: &Arc<ConnHandle>,
    app: &Arc<App>,
) -> SplitStream<WebSocketStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let session = Session::new(conn.clone(), app.clone());
    loop {
        let next = tokio::select! {
            biased;
            _ = conn.closed().cancelled() => return stream,
            next = stream.next() => next,
        };
        let message = match next {
            None => return stream,
            Some(Ok(message)) => message,
            Some(Err(WsError::Capacity(e))) => {
                tracing::info!(error = %e, "frame over the limit, closing with 1009");
                metrics::counter!("gateway_oversize_frames_total").increment(1);
                conn.close(CloseCode::Size);
                return stream;
            }
            Some(Err(WsError::Io(e))) if TooManyFragments::is(&e) => {
                tracing::info!(error = %e, "a message in too many frames, closing with 1009");
                metrics::counter!("gateway_oversize_frames_total").increment(1);
                conn.close(CloseCode::Size);
                return stream;
            }
            Some(Err(WsError::Utf8(e))) => {
                // RFC 6455 §8.1: a text frame that is not UTF-8 fails the connection with
                // 1007 (Autobahn 6.x expects it).
                tracing::info!(error = %e, "a text frame is not UTF-8, closing with 1007");
                conn.close(CloseCode::Invalid);
                return stream;
            }
            Some(Err(WsError::Protocol(e))) => {
                tracing::info!(error = %e, "WebSocket protocol error");
                conn.close(CloseCode::Protocol);
                return stream;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "read failed");
                return stream;
            }
        };
        conn.heard(app.now_ms());
        match message {
            WsMessage::Text(text) => {
                // Boxed: handling a request is a large state machine (every backend call
                // it may make); inline, every idle connection would carry it.
                Box::pin(session.on_text(&text)).await;
            }
            WsMessage::Binary(_) => {
                metrics::counter!("gateway_frames_received_total", "type" => "invalid")
                    .increment(1);
                session.refuse(Refusal::bad_request(
                    "binary frames are not part of the protocol: send JSON in text frames",
                ))
            }
            WsMessage::Close(_) => return stream,
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
        }
    }
}

/// The end of a connection after its close frame is out (once the writer has ended):
/// half-closes it, then reads and discards what the client still sends until it closes its
/// side too, for at most `LINGER`.
/// Closing a socket with unread bytes in it makes the kernel answer with a reset, and a
/// reset can destroy the close frame before the client reads it: a 1009 in the middle of
/// a 16 MiB message, or a 1012 while the client is still sending, would reach the client
/// as a bare reset (RFC 6455 §7.1.1: the server closes the TCP connection after the close
/// handshake; Autobahn 9.x).
async fn linger<S>(
    stream: SplitStream<WebSocketStream<S>>,
    writer: JoinHandle<SplitSink<WebSocketStream<S>, WsMessage>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(sink) = writer.await else { return };
    let Ok(mut ws) = stream.reunite(sink) else {
        return;
    };
    let io = ws.get_mut();
    let _ = timeout(LINGER, async {
        io.shutdown().await?;
        let mut discard = [0u8; 4096];
        loop {
            match io.read(&mut discard).await {
                Ok(0) => return Ok::<_, std::io::Error>(()),
                Ok(_) => {}
                // The rest of a message cut short by the size limit may still go over the
                // fragment cap: that read fails once, and the cap is off after it.
                Err(e) if TooManyFragments::is(&e) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
}

/// Writes what is queued, and pings, until the connection closes; then sends its close
/// frame and gives the sink back for `linger`. An `async move` block for the reason
/// `serve` is one: its task lives as long as the connection.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice, in every idle connection's task"
)]
fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, WsMessage>,
    outbound: flume::Receiver<Utf8Bytes>,
    conn: Arc<ConnHandle>,
    app: Arc<App>,
) -> impl Future<Output = SplitSink<WebSocketStream<S>, WsMessage>> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let heartbeat = app.config.heartbeat();
        let mut ping = interval_at(Instant::now() + heartbeat, heartbeat);
        loop {
            tokio::select! {
                biased;
                _ = conn.closed().cancelled() => break,
                frame = outbound.recv_async() => {
                    let Ok(frame) = frame else { break };
                    // Boxed: a write is short-lived, and inline its state would be part of
                    // every idle connection's task.
                    let mut write = Box::pin(async {
                        sink.feed(WsMessage::Text(frame)).await?;
                        for _ in 1..MAX_WRITE_BATCH {
                            match outbound.try_recv() {
                                Ok(frame) => sink.feed(WsMessage::Text(frame)).await?,
                                Err(_) => break,
                            }
                        }
                        conn.took_frames();
                        sink.flush().await
                    });
                    let written = tokio::select! {
                        written = &mut write => written,
                        _ = conn.closed().cancelled() => {
                            // Closing while a write is stuck (the client stopped reading): give
                            // it a bounded grace so the close frame can follow what was sent.
                            match Box::pin(timeout(CLOSE_GRACE, &mut write)).await {
                                Ok(written) => written,
                                Err(_) => {
                                    drop(write);
                                    return sink;
                                }
                            }
                        }
                    };
                    if written.is_err() {
                        // Most often the peer closed first (tungstenite refuses to send after
                        // its close frame): what is queued, the close reply among it, is
                        // still flushed below.
                        conn.drop_connection();
                        break;
                    }
                }
                _ = ping.tick() => {
                    let silent_ms = app.now_ms().saturating_sub(conn.last_heard());
                    if silent_ms > 2 * heartbeat.as_millis() as u64 {
                        tracing::info!(silent_ms, "no pong within two heartbeats, closing");
                        conn.close(CloseCode::Away);
                        break;
                    }
                    tokio::select! {
                        sent = sink.send(WsMessage::Ping(Default::default())) => if sent.is_err() {
                            conn.drop_connection();
                            break;
                        },
                        _ = conn.closed().cancelled() => break,
                    }
                }
            }
        }
        if conn.close_code() == Some(CloseCode::Restart) {
            // A drain: the client gets the answers to the sends it made before the close
            // frame, so it does not send them again through another node, where they could
            // overtake the originals.
            let settle = app.config.backend_timeout() + Duration::from_secs(1);
            if Box::pin(timeout(settle, settle_sends(&mut sink, &outbound, &conn)))
                .await
                .is_err()
            {
                tracing::info!("sends still unanswered at the end of the drain");
            }
        }
        if let Some(code) = conn.close_code() {
            let reason = match code {
                CloseCode::Policy => "too slow: reconnect to get what you missed",
                CloseCode::Size => "message too large, or in too many frames",
                CloseCode::Restart => "server restarting: reconnect",
                CloseCode::Away => "heartbeat timeout",
                _ => "",
            };
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = Box::pin(timeout(
                CLOSE_GRACE,
                sink.send(WsMessage::Close(Some(frame))),
            ))
            .await;
        }
        let _ = Box::pin(timeout(Duration::from_secs(2), sink.close())).await;
        sink
    }
}

/// Writes what is queued until the reader has stopped and every send it read has its
/// answer queued (answers come from the dispatcher, or `unavailable` at the send's deadline),
/// then what remains. Checked after each frame and every 20 ms: an answer is queued before
/// its send stops counting as waiting.
async fn settle_sends<S>(
    sink: &mut SplitSink<WebSocketStream<S>, WsMessage>,
    outbound: &flume::Receiver<Utf8Bytes>,
    conn: &ConnHandle,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let settled = conn.settled();
        while let Ok(frame) = outbound.try_recv() {
            if sink.feed(WsMessage::Text(frame)).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() || settled {
            return;
        }
        if let Ok(Ok(frame)) = timeout(Duration::from_millis(20), outbound.recv_async()).await {
            if sink.feed(WsMessage::Text(frame)).await.is_err() {
                return;
            }
        }
    }
}

/// Replays the pending queue again on a live connection. For after presence was restored:
/// a message stored while its recipient could not be located was not delivered live, and
/// nothing else would bring it before the next connect. What the connection got live and
/// has not acked yet comes again (clients drop repeats by `message_id`); what its last
/// replay sent less than 30 s ago does not.
pub async fn catch_up(conn: Arc<ConnHandle>, app: Arc<App>) {
    if conn.begin_replay() {
        metrics::counter!("gateway_catch_ups_total").increment(1);
        replay(conn, app).await;
    }
}

/// Pushes what is pending for this device, oldest first: its user's pending messages, and
/// its own queue (end-to-end encrypted messages, to-device messages and key notices),
/// merged by id, so that a to-device message that starts a session comes before the
/// messages that need it. Then the notices (receipts, group changes) kept for the user (not
/// yet confirmed by any of their devices), then releases the live messages that arrived
/// meanwhile.
///
/// Its task lives (allocated at its future's size) as long as the connection, whose end
/// awaits it: every store call is boxed, so that the future holds pointers, not the
/// backends' request state machines (inline, those cost ~13 KiB per idle connection).
async fn replay(conn: Arc<ConnHandle>, app: Arc<App>) {
    // Sent already on this connection: not sent again.
    let mut replayed: HashSet<Uuid> = conn.recently_replayed();
    let before = replayed.len();
    // A catch-up asked for while this runs would not see what was stored after this
    // pass read the queue: it makes the pass run again before the replay ends (sending
    // only what the passes before it did not).
    loop {
        if !Box::pin(replay_pass(&conn, &app, &mut replayed)).await {
            return;
        }
        let count = replayed.len() - before;
        if Box::pin(conn.finish_replay(&mut replayed)).await {
            // The device's pending queues as it found them on connecting.
            metrics::histogram!("gateway_replayed_messages").record(count as f64);
            return;
        }
    }
}

/// One pass of a replay (see [`replay`]); `false` when the connection is gone.
async fn replay_pass(conn: &Arc<ConnHandle>, app: &Arc<App>, replayed: &mut HashSet<Uuid>) -> bool {
    let mut feeds = vec![Feed::new(Queue::Pending(conn.user.clone()))];
    // Only a device with published keys has queues of its own: for the others, one read
    // spares two (and the memory a connect storm holds meanwhile).
    let devices = Box::pin(app.store.devices(std::slice::from_ref(&conn.user)));
    let has_keys = match timeout(app.config.backend_timeout(), devices).await {
        Ok(Ok(devices)) => devices.iter().any(|d| d.device == conn.device),
        // In doubt, read them.
        _ => true,
    };
    if has_keys {
        let own = storage::device_address(&conn.user, &conn.device);
        feeds.push(Feed::new(Queue::Pending(own.clone())));
        feeds.push(Feed::new(Queue::Notices(own)));
    }
    loop {
        for feed in &mut feeds {
            if let Err(failed) = Box::pin(feed.refill(app)).await {
                tracing::warn!(
                    %failed,
                    "reading pending messages failed; closing so the client retries"
                );
                conn.close(CloseCode::Error);
                return false;
            }
        }
        let oldest = feeds
            .iter()
            .enumerate()
            .filter_map(|(at, f)| f.items.front().map(|item| (item.id().as_u128(), at)))
            .min()
            .map(|(_, at)| at);
        let Some(item) = oldest.and_then(|at| feeds[at].items.pop_front()) else {
            break;
        };
        if !replayed.insert(item.id()) {
            continue;
        }
        let frame = Utf8Bytes::from(item.frame(conn).to_json());
        if !conn.send_waiting(frame).await {
            return false;
        }
    }
    // Then the notices (receipts, group changes) kept for this user: all of them, until a
    // device confirms them.
    let mut after = None;
    loop {
        let kept = match timeout(
            app.config.backend_timeout(),
            Box::pin(app.store.notices(&conn.user, after, REPLAY_PAGE)),
        )
        .await
        {
            Ok(Ok(kept)) => kept,
            failed => {
                tracing::warn!(?failed, "reading kept notices failed");
                break;
            }
        };
        after = kept.last().map(|(id, _)| *id).or(after);
        for (id, notice) in &kept {
            if !replayed.insert(*id) {
                continue;
            }
            if !conn
                .send_waiting(Utf8Bytes::from(ServerFrame::notice(*id, notice).to_json()))
                .await
            {
                return false;
            }
        }
        if kept.len() < REPLAY_PAGE {
            break;
        }
    }
    true
}

/// A queue a replay reads.
enum Queue {
    /// Pending messages of a user's or a device's queue.
    Pending(String),
    /// Notices kept for a device.
    Notices(String),
}

enum Replayed {
    Message(storage::Message),
    Notice(Uuid, storage::Notice),
}

impl Replayed {
    fn frame(self, conn: &ConnHandle) -> ServerFrame {
        match self {
            Replayed::Message(m) => {
                metrics::counter!("gateway_replayed_messages_total").increment(1);
                ServerFrame::message(&m, &conn.user, &conn.device)
            }
            Replayed::Notice(id, notice) => ServerFrame::notice(id, &notice),
        }
    }

    fn id(&self) -> Uuid {
        match self {
            Replayed::Message(m) => m.id,
            Replayed::Notice(id, _) => *id,
        }
    }
}

/// One queue of a replay, read a page at a time, oldest first.
struct Feed {
    queue: Queue,
    items: std::collections::VecDeque<Replayed>,
    after: Option<Uuid>,
    done: bool,
}

impl Feed {
    fn new(queue: Queue) -> Self {
        Feed {
            queue,
            items: Default::default(),
            after: None,
            done: false,
        }
    }

    /// Reads the next page once the last one is used up.
    async fn refill(&mut self, app: &App) -> Result<(), String> {
        if !self.items.is_empty() || self.done {
            return Ok(());
        }
        let wait = app.config.backend_timeout();
        let page: Vec<Replayed> = match &self.queue {
            Queue::Pending(queue) => {
                match timeout(
                    wait,
                    Box::pin(app.store.pending(queue, self.after, REPLAY_PAGE)),
                )
                .await
                {
                    Ok(Ok(page)) => page.into_iter().map(Replayed::Message).collect(),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("timed out".into()),
                }
            }
            Queue::Notices(queue) => {
                match timeout(
                    wait,
                    Box::pin(app.store.notices(queue, self.after, REPLAY_PAGE)),
                )
                .await
                {
                    Ok(Ok(page)) => page
                        .into_iter()
                        .map(|(id, n)| Replayed::Notice(id, n))
                        .collect(),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("timed out".into()),
                }
            }
        };
        self.done = page.len() < REPLAY_PAGE;
        self.after = page.last().map(Replayed::id).or(self.after);
        self.items = page.into();
        Ok(())
    }
}
