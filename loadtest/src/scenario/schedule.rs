//! The open-loop schedule: who sends what to whom at each intended time (groups created
//! first), the churn of connections, and the drain after the send window.

use super::*;

/// The groups of the group workload: user `i` belongs to group `i / size`.
#[derive(Debug)]
pub(super) struct Groups {
    pub(super) size: u32,
    /// Group number → (conversation, members).
    pub(super) by_number: HashMap<u32, (String, Vec<u32>)>,
}

/// Creates the groups of the group workload over short setup connections.
pub(super) async fn create_groups(fleet: &Fleet, size: u32) -> anyhow::Result<Groups> {
    let size = size.max(2);
    let mut groups = HashMap::new();
    let mut first = (fleet.first_user / size) * size;
    while first < fleet.first_user + fleet.local_users {
        let members: Vec<u32> = (first..(first + size).min(fleet.users)).collect();
        let creator = members[0];
        let token = fleet
            .tokens
            .token(
                &fleet.urls[creator as usize % fleet.urls.len()],
                &fleet.user(creator),
            )
            .await?;
        let mut target = fleet.target(creator, token);
        target.device = "setup".into();
        let (mut writer, mut reader, _) = client::connect(&target).await?;
        let others: Vec<String> = members[1..].iter().map(|m| fleet.user(*m)).collect();
        writer
            .send(&ClientFrame::CreateGroup {
                reference: json!(first),
                name: format!("lt group {first}"),
                members: others,
            })
            .await?;
        let conversation = loop {
            match reader.next().await? {
                Some(ServerFrame::Group { conversation, .. }) => break conversation,
                Some(ServerFrame::Error { code, message, .. }) => {
                    anyhow::bail!("creating a group: {code}: {message}")
                }
                Some(_) => continue,
                None => anyhow::bail!("the connection closed while creating a group"),
            }
        };
        writer.close().await;
        groups.insert(first / size, (conversation, members));
        first += size;
    }
    Ok(Groups {
        size,
        by_number: groups,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn schedule(
    fleet: &Fleet,
    shared: &Arc<Shared>,
    groups: &Option<Groups>,
    rates: &[f64],
    step: Duration,
    options: &Options,
    origin: Instant,
    origin_us: u64,
) {
    let total: u64 = rates.iter().map(|r| (r * step.as_secs_f64()) as u64).sum();
    let progress = crate::report::progress(options.progress, total, "sending");
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut step_start = origin;
    for rate in rates {
        let count = (rate * step.as_secs_f64()) as u64;
        for j in 0..count {
            let intended = step_start + Duration::from_secs_f64(j as f64 / rate);
            if intended > Instant::now() {
                tokio::time::sleep_until(intended).await;
            }
            let intended_us = origin_us + intended.duration_since(origin).as_micros() as u64;
            // An online sender, chosen at random (a few tries while users reconnect).
            let mut sender = None;
            for _ in 0..8 {
                let agent = &shared.agents[rng.gen_range(0..shared.agents.len())];
                if agent.online.load(Ordering::Acquire) {
                    sender = Some(agent.clone());
                    break;
                }
            }
            let Some(sender) = sender else {
                shared.collector().stats.error("sender_offline");
                continue;
            };
            let group = groups
                .as_ref()
                .and_then(|g| g.by_number.get(&(sender.index / g.size)));
            let (to, conversation, recipients) = match group {
                _ if options.e2ee && group.is_none() => {
                    let contacts = contacts(fleet, sender.index);
                    if contacts.is_empty() {
                        shared.collector().stats.error("no_contacts");
                        continue;
                    }
                    let recipient = contacts[rng.gen_range(0..contacts.len())];
                    (Some(fleet.user(recipient)), None, vec![recipient])
                }
                Some((conversation, members)) => {
                    let recipients = members
                        .iter()
                        .copied()
                        .filter(|m| *m != sender.index)
                        .collect();
                    (None, Some(conversation.clone()), recipients)
                }
                _ => {
                    let mut recipient = rng.gen_range(0..fleet.users.max(2) - 1);
                    if recipient >= sender.index {
                        recipient += 1;
                    }
                    (Some(fleet.user(recipient)), None, vec![recipient])
                }
            };
            let seq = sender.seq.fetch_add(1, Ordering::Relaxed);
            let k = key(sender.index, seq);
            let body = Body {
                sender: sender.index,
                seq,
                intended_us,
            }
            .encode(options.body_bytes);
            let client_msg_id = format!("s{}.{seq}", sender.index);
            let frame = match sender.e2ee() {
                // Encrypted here, in send order: each session's messages go out in the
                // order they were encrypted.
                Some(mut e2ee) => {
                    let encrypted = match (&to, &conversation) {
                        (Some(to), _) => e2ee
                            .device
                            .encrypt_direct(&[(to.clone(), DEVICE.to_owned())], &body),
                        (None, Some(conversation)) => {
                            e2ee.device.encrypt_group(conversation, &body)
                        }
                        (None, None) => Err(anyhow::anyhow!("no recipient")),
                    };
                    match encrypted {
                        Ok(e2ee) => json!({
                            "type": "send",
                            "client_msg_id": client_msg_id,
                            "to": to,
                            "conversation": conversation,
                            "e2ee": e2ee,
                        })
                        .to_string(),
                        Err(e) => {
                            tracing::warn!(error = %e, "encrypting failed");
                            drop(e2ee);
                            shared.collector().stats.error("encrypt_failed");
                            continue;
                        }
                    }
                }
                None => ClientFrame::Send {
                    client_msg_id,
                    to,
                    conversation,
                    body,
                    attachments: match sender.media.get() {
                        Some(media) if rng.gen_bool(options.attachments.clamp(0.0, 1.0)) => {
                            vec![json!({ "media_id": media })]
                        }
                        _ => Vec::new(),
                    },
                }
                .to_json(),
            };
            {
                let mut c = shared.collector();
                c.in_flight.insert(k, (recipients, intended_us));
                c.stats.offered += 1;
                let second = c.second_of(intended_us);
                c.stats.second(second).offered += 1;
            }
            if sender.outbox.send(frame).await.is_err() {
                shared.collector().stats.error("client_closed");
            }
            progress.inc(1);
        }
        step_start += step;
    }
    progress.finish_and_clear();
}

/// Drops a fraction of the users every `every`, each coming back after `offline`.
pub(super) async fn churn(shared: Arc<Shared>, fraction: f64, every: Duration, offline: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        tick.tick().await;
        let count = ((shared.agents.len() as f64) * fraction).ceil() as usize;
        for _ in 0..count {
            let agent = &shared.agents[rng.gen_range(0..shared.agents.len())];
            *agent.drop_for.lock().unwrap_or_else(|e| e.into_inner()) = Some(offline);
            agent.dropped.notify_one();
        }
        shared.collector().stats.error("reconnects_forced");
    }
}

/// Waits for the answers and deliveries still owed, at most `options.drain`.
pub(super) async fn drain(shared: &Arc<Shared>, options: &Options) {
    let deadline = Instant::now() + options.drain;
    let mut last_deliveries = u64::MAX;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let (in_flight, outstanding, deliveries) = {
            let c = shared.collector();
            let outstanding = if options.partial {
                0
            } else {
                c.ledger.outstanding()
            };
            (c.in_flight.len(), outstanding, c.stats.deliveries)
        };
        if deliveries != last_deliveries {
            last_deliveries = deliveries;
            quiet_since = Instant::now();
        }
        let quiet = options.partial && quiet_since.elapsed() > Duration::from_secs(2);
        if in_flight == 0 && (outstanding == 0 && !options.partial || quiet) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
