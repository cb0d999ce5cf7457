//! One user's agent: its connection (set up, with end-to-end keys or an uploaded file when
//! asked), the writer that batches its sends, and the reader that checks every frame
//! against the ledger.

use super::*;

/// One user: connect, serve the connection, reconnect when told to, until the run stops.
pub(super) async fn agent_loop(
    agent: Arc<Agent>,
    target: Target,
    mut inbox: mpsc::Receiver<String>,
    shared: Arc<Shared>,
    limit: Arc<tokio::sync::Semaphore>,
) {
    let mut announced = false;
    let mut backoff = Duration::from_millis(100);
    while !shared.stop.is_cancelled() {
        let started = Instant::now();
        let connected = {
            let _permit = limit.acquire().await;
            client::connect(&target).await
        };
        let (mut writer, reader) = match connected {
            Ok((writer, reader, _welcome)) => (writer, reader),
            Err(e) => {
                tracing::debug!(user = %target.user, error = %e, "connect failed");
                shared.collector().stats.error(connect_error_kind(&e));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        {
            let mut c = shared.collector();
            let _ = c.stats.connect.record(started.elapsed().as_micros() as u64);
            if !announced {
                c.stats.connected += 1;
            }
        }
        agent.online.store(true, Ordering::Release);
        if !announced {
            announced = true;
            agent.ready.notify_one();
        }

        let (acks, mut ack_inbox) = mpsc::unbounded_channel::<Confirm>();
        let reading = tokio::spawn(read_loop(agent.clone(), reader, acks, shared.clone()));
        let mut dropped = false;
        loop {
            tokio::select! {
                _ = shared.stop.cancelled() => break,
                _ = agent.dropped.notified() => { dropped = true; break; }
                frame = inbox.recv() => {
                    let Some(frame) = frame else { break };
                    let mut batch = vec![frame];
                    while batch.len() < 64 {
                        match inbox.try_recv() {
                            Ok(f) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                    if write_all(&mut writer, batch).await.is_err() { break; }
                }
                frame = recv_acks(&mut ack_inbox) => {
                    let Some(frame) = frame else { break };
                    if writer.send(&frame).await.is_err() { break; }
                }
            }
        }
        agent.online.store(false, Ordering::Release);
        if dropped {
            // Vanish without a close handshake, as a phone losing its network does.
            reading.abort();
            drop(writer);
        } else {
            writer.close().await;
            reading.abort();
        }
        if shared.stop.is_cancelled() {
            break;
        }
        let offline = agent
            .drop_for
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(offline) = offline {
            tokio::select! {
                _ = tokio::time::sleep(offline) => {}
                _ = shared.stop.cancelled() => break,
            }
        }
    }
}

pub(super) async fn write_all(
    writer: &mut client::Writer,
    batch: Vec<String>,
) -> client::Result<()> {
    for frame in batch {
        writer.feed_text(frame).await?;
    }
    writer.flush().await
}

/// What a connection confirms to the server.
pub(super) enum Confirm {
    Message(String),
    Receipt(String),
    Notice(String),
}

/// The next `ack` frame: what is waiting, up to 100 ids of each kind.
pub(super) async fn recv_acks(inbox: &mut mpsc::UnboundedReceiver<Confirm>) -> Option<ClientFrame> {
    let mut waiting = Vec::new();
    if inbox.recv_many(&mut waiting, 100).await == 0 {
        return None;
    }
    let (mut message_ids, mut receipt_ids, mut notice_ids) = (Vec::new(), Vec::new(), Vec::new());
    for confirm in waiting {
        match confirm {
            Confirm::Message(id) => message_ids.push(id),
            Confirm::Receipt(id) => receipt_ids.push(id),
            Confirm::Notice(id) => notice_ids.push(id),
        }
    }
    Some(ClientFrame::Ack {
        message_ids,
        receipt_ids,
        notice_ids,
    })
}

/// How a connect failed, as counted in the report's errors: `http_<status>` when the
/// server refused the upgrade with an HTTP status.
pub(super) fn connect_error_kind(e: &client::Error) -> String {
    match e {
        client::Error::Connect { .. } => "connect_failed".into(),
        client::Error::Handshake {
            status: Some(status),
            ..
        } => format!("http_{status}"),
        client::Error::Handshake { .. } => "handshake_failed".into(),
        _ => "connect_other".into(),
    }
}

/// Reads one connection's frames into the collector; acks messages through `acks`.
pub(super) async fn read_loop(
    agent: Arc<Agent>,
    mut reader: client::Reader,
    acks: mpsc::UnboundedSender<Confirm>,
    shared: Arc<Shared>,
) {
    let me = agent.index;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(user = me, error = %e, "read failed");
                return;
            }
        };
        let now = now_us();
        match frame {
            ServerFrame::Sent { client_msg_id, .. } => {
                let Some(k) = parse_client_msg_id(&client_msg_id) else {
                    continue;
                };
                let mut c = shared.collector();
                if let Some((recipients, intended)) = c.in_flight.remove(&k) {
                    let _ = c.stats.sent.record(now.saturating_sub(intended).max(1));
                    c.stats.accepted += 1;
                    c.ledger.accept(k, recipients);
                }
            }
            ServerFrame::Message(m) => {
                let body = match agent.e2ee() {
                    Some(mut e2ee) => match e2ee.open(&m) {
                        Ok(body) => body,
                        Err(e) => {
                            tracing::warn!(user = me, error = %e, "decrypting failed");
                            drop(e2ee);
                            shared.collector().stats.error("undecryptable");
                            continue;
                        }
                    },
                    None => Body::decode(&m.body),
                };
                if let Some(body) = body {
                    let k = key(body.sender, body.seq);
                    let mut c = shared.collector();
                    if c.ledger.arrive(me, k) {
                        let latency = now.saturating_sub(body.intended_us).max(1);
                        let _ = c.stats.delivered.record(latency);
                        c.stats.deliveries += 1;
                        match c.schedule_end_us {
                            None => c.stats.delivered_in_window += 1,
                            Some(end) => {
                                let after = now.saturating_sub(end) / 1000;
                                c.stats.drain_ms = c.stats.drain_ms.max(after);
                            }
                        }
                        let second = c.second_of(now);
                        let s = c.stats.second(second);
                        s.delivered += 1;
                        let _ = s.latency.record(latency);
                    } else {
                        // Allowed (a device drops a repeat by id) but counted: the id lets
                        // the repeat be found in the servers' logs.
                        tracing::warn!(
                            user = me,
                            message_id = %m.message_id,
                            sender = body.sender,
                            seq = body.seq,
                            "delivered again"
                        );
                    }
                }
                for a in &m.attachments {
                    // The expected hash travels in `ref`, back with the answer.
                    let ask = json!({"type": "media_url", "ref": a.sha256, "media_id": a.media_id,
                        "conversation": m.conversation, "message_id": m.message_id});
                    if agent.outbox.try_send(ask.to_string()).is_err() {
                        shared.collector().stats.error("attachment_not_asked");
                    }
                }
                if shared.read {
                    let read = json!({"type": "read", "conversation": m.conversation,
                        "message_id": m.message_id});
                    if agent.outbox.try_send(read.to_string()).is_err() {
                        shared.collector().stats.error("read_not_sent");
                    }
                }
                let _ = acks.send(Confirm::Message(m.message_id));
            }
            ServerFrame::MediaUrl { reference, url, .. } => {
                let expected = reference.as_str().unwrap_or_default().to_owned();
                let shared2 = shared.clone();
                shared.downloads.spawn(async move {
                    let outcome = download_sha256(&shared2.http, &url).await;
                    let mut c = shared2.collector();
                    match outcome {
                        Ok(got) if got == expected => c.stats.attachments_verified += 1,
                        Ok(_) => c.stats.error("attachment_bytes_differ"),
                        Err(e) => {
                            tracing::warn!(error = %e, "downloading an attachment failed");
                            c.stats.error("attachment_download_failed");
                        }
                    }
                });
            }
            ServerFrame::Receipt {
                receipt_id,
                message_id,
                by,
                status,
                ..
            } => {
                if status == "read" {
                    let first = agent
                        .read_receipts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((message_id, by));
                    if first {
                        shared.collector().stats.read_receipts += 1;
                    }
                }
                // Shown: no longer kept for this user's next connect.
                let _ = acks.send(Confirm::Receipt(receipt_id));
            }
            ServerFrame::ToDevice {
                notice_id,
                from,
                e2ee,
            } => {
                if let Some(mut state) = agent.e2ee() {
                    let frame = json!({"from": from, "e2ee": e2ee});
                    if let Err(e) = state.device.receive_to_device(&frame) {
                        tracing::warn!(user = me, error = %e, "a to-device message failed");
                        drop(state);
                        shared.collector().stats.error("undecryptable");
                    }
                }
                let _ = acks.send(Confirm::Notice(notice_id));
            }
            ServerFrame::KeysLow { notice_id, .. } => {
                // Replenished, as a client does: more one-time keys (the writer sends them).
                let upload = agent.e2ee().map(|mut state| {
                    state
                        .device
                        .keys_upload("more-keys", crate::e2ee::KEYS_PER_UPLOAD)
                });
                if let Some(upload) = upload {
                    if agent.outbox.try_send(upload.to_string()).is_err() {
                        shared.collector().stats.error("keys_not_replenished");
                    }
                }
                let _ = acks.send(Confirm::Notice(notice_id));
            }
            ServerFrame::Error {
                code,
                client_msg_id,
                ..
            } => {
                let mut c = shared.collector();
                if let Some(k) = client_msg_id.as_deref().and_then(parse_client_msg_id) {
                    c.in_flight.remove(&k);
                }
                c.stats.error(code);
            }
            _ => {}
        }
    }
}

impl Decrypting {
    /// The body a message carried: decrypted the first time, remembered after (an Olm
    /// message cannot be decrypted twice, and a message can come again).
    pub(super) fn open(&mut self, m: &client::MessageFrame) -> anyhow::Result<Option<Body>> {
        if let Some(body) = self.seen.get(&m.message_id) {
            return Ok(Some(*body));
        }
        let frame = json!({"from": m.from, "e2ee": m.e2ee});
        let plaintext = self.device.decrypt(&frame)?;
        let body = Body::decode(&plaintext);
        if let Some(body) = body {
            self.seen.insert(m.message_id.clone(), body);
        }
        Ok(body)
    }
}

/// The device every user of a run connects as.
pub(super) const DEVICE: &str = "lt";

/// Sets up end-to-end encryption before anyone connects, over a setup connection per
/// user as the device the run uses: every device publishes its keys; then each claims a
/// key of every device it will write to and starts an Olm session with it, and in the
/// group workload shares a Megolm session with its group's other devices (to-device
/// messages, which reach them on connect).
pub(super) async fn e2ee_setup(
    fleet: &Fleet,
    shared: &Arc<Shared>,
    groups: &Option<Groups>,
) -> anyhow::Result<()> {
    use futures_util::{StreamExt, TryStreamExt};
    let limit = fleet.concurrency.max(1);
    // 1. Keys, on connections kept for step 2.
    let connections: Vec<(client::Writer, client::Reader)> =
        futures_util::stream::iter(shared.agents.iter().cloned())
            .map(|agent| async move {
                let (mut writer, mut reader) = setup_connection(fleet, agent.index).await?;
                let upload = match agent.e2ee() {
                    Some(mut e2ee) => e2ee
                        .device
                        .keys_upload("keys", crate::e2ee::KEYS_PER_UPLOAD),
                    None => anyhow::bail!("no E2EE state"),
                };
                writer.send_text(upload.to_string()).await?;
                expect(&mut reader, |f| matches!(f, ServerFrame::Keys { .. })).await?;
                Ok::<_, anyhow::Error>((writer, reader))
            })
            .buffered(limit)
            .try_collect()
            .await?;
    // 2. Sessions (and group keys), once every device's keys are there.
    futures_util::stream::iter(shared.agents.iter().cloned().zip(connections))
        .map(|(agent, (mut writer, mut reader))| async move {
            let peers: Vec<u32> = match groups
                .as_ref()
                .and_then(|g| g.by_number.get(&(agent.index / g.size)))
            {
                Some((_, members)) => members
                    .iter()
                    .copied()
                    .filter(|m| *m != agent.index)
                    .collect(),
                None => contacts(fleet, agent.index),
            };
            if peers.is_empty() {
                writer.close().await;
                return Ok(());
            }
            let devices: Vec<Value> = peers
                .iter()
                .map(|p| json!({"user": fleet.user(*p), "device": DEVICE}))
                .collect();
            writer
                .send_text(json!({"type":"keys_claim","ref":"claim","devices":devices}).to_string())
                .await?;
            let keys = match expect(&mut reader, |f| {
                matches!(f, ServerFrame::KeysClaimed { .. })
            })
            .await?
            {
                ServerFrame::KeysClaimed { keys, .. } => keys,
                _ => unreachable!("matched above"),
            };
            anyhow::ensure!(
                keys.len() == peers.len(),
                "{} of {} devices had keys",
                keys.len(),
                peers.len()
            );
            let share = {
                let Some(mut e2ee) = agent.e2ee() else {
                    anyhow::bail!("no E2EE state")
                };
                e2ee.device.start_sessions(&json!({ "keys": keys }))?;
                match groups
                    .as_ref()
                    .and_then(|g| g.by_number.get(&(agent.index / g.size)))
                {
                    Some((conversation, members)) => {
                        let devices: Vec<_> = members
                            .iter()
                            .map(|m| (fleet.user(*m), DEVICE.to_owned()))
                            .collect();
                        e2ee.device.share_group_key(conversation, &devices)?
                    }
                    None => None,
                }
            };
            if let Some(mut share) = share {
                share["ref"] = json!("share");
                writer.send_text(share.to_string()).await?;
                expect(&mut reader, |f| {
                    matches!(f, ServerFrame::ToDeviceSent { .. })
                })
                .await?;
            }
            writer.close().await;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(limit)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// A connection of user `index` for set-up before the run (the agent's own comes later).
pub(super) async fn setup_connection(
    fleet: &Fleet,
    index: u32,
) -> anyhow::Result<(client::Writer, client::Reader)> {
    let url = &fleet.urls[index as usize % fleet.urls.len()];
    let token = fleet.tokens.token(url, &fleet.user(index)).await?;
    let (writer, reader, _) = client::connect(&fleet.target(index, token)).await?;
    Ok((writer, reader))
}

/// Downloads a file and returns its SHA-256 (hex).
pub(super) async fn download_sha256(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    use sha2::Digest;
    let response = http.get(url).send().await?.error_for_status()?;
    Ok(hex::encode(sha2::Sha256::digest(&response.bytes().await?)))
}

/// Each user uploads one file of `bytes` random bytes, as a client does: an upload slot,
/// a PUT to its URL, `media_complete`. Its messages with an attachment carry it.
pub(super) async fn media_setup(
    fleet: &Fleet,
    shared: &Arc<Shared>,
    bytes: usize,
) -> anyhow::Result<()> {
    use futures_util::{StreamExt, TryStreamExt};
    use sha2::Digest;
    futures_util::stream::iter(shared.agents.iter().cloned())
        .map(|agent| async move {
            let (mut writer, mut reader) = setup_connection(fleet, agent.index).await?;
            let file: Vec<u8> = (0..bytes.max(1)).map(|_| rand::random::<u8>()).collect();
            let sha256 = hex::encode(sha2::Sha256::digest(&file));
            let ask = json!({"type": "media_upload", "ref": "upload",
                "content_type": "application/octet-stream", "size": file.len(), "sha256": sha256});
            writer.send_text(ask.to_string()).await?;
            let (media_id, put_url, headers) = match expect(&mut reader, |f| {
                matches!(f, ServerFrame::MediaUpload { .. })
            })
            .await?
            {
                ServerFrame::MediaUpload {
                    media_id,
                    url,
                    headers,
                    ..
                } => (media_id, url, headers),
                _ => unreachable!("matched above"),
            };
            let mut put = shared.http.put(&put_url).body(file);
            for (name, value) in headers {
                put = put.header(name, value);
            }
            put.send().await?.error_for_status()?;
            let complete =
                json!({"type": "media_complete", "ref": "complete", "media_id": media_id});
            writer.send_text(complete.to_string()).await?;
            expect(&mut reader, |f| {
                matches!(f, ServerFrame::MediaComplete { .. })
            })
            .await?;
            writer.close().await;
            let _ = agent.media.set(media_id);
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(fleet.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The next frame that `wanted` accepts; an `error` ends the setup.
pub(super) async fn expect(
    reader: &mut client::Reader,
    wanted: impl Fn(&ServerFrame) -> bool,
) -> anyhow::Result<ServerFrame> {
    loop {
        match reader.next().await? {
            Some(frame) if wanted(&frame) => return Ok(frame),
            Some(ServerFrame::Error { code, message, .. }) => {
                anyhow::bail!("setting up end-to-end encryption: {code}: {message}")
            }
            Some(_) => continue,
            None => anyhow::bail!("the connection closed while setting up end-to-end encryption"),
        }
    }
}

pub(super) fn parse_client_msg_id(id: &str) -> Option<Key> {
    let (sender, seq) = id.strip_prefix('s')?.split_once('.')?;
    Some(key(sender.parse().ok()?, seq.parse().ok()?))
}
