//! The server side of end-to-end encryption: device keys, claims of one-time keys,
//! to-device messages, and the device-list check of an encrypted send. The server relays
//! and keeps ciphertexts; it checks who they are for, never what they say.

use std::collections::{BTreeSet, HashMap};

use base64::Engine;
use presence::Payload;
use storage::{
    device_address, Conversation, Device, DeviceKeys, E2ee, ForDevice, Group, GroupCiphertext,
    MessageStore, Notice, OlmCiphertext, OneTimeKey, ToDevice,
};
use uuid::Uuid;

use crate::protocol::{
    ClaimedView, DeviceRef, E2eeSend, ErrorCode, KeyView, Mismatch, Refusal, ToDeviceSend,
};
use crate::session::Session;

/// Most one-time keys one `keys_upload` may carry.
pub const MAX_KEYS_PER_UPLOAD: usize = 100;
/// Below this many one-time keys left, a claim tells the device (`keys_low`).
pub const LOW_KEYS: usize = 10;
/// Most devices one `keys_claim` may name.
pub const MAX_CLAIMS: usize = 100;
/// Most devices one encrypted send or `to_device` frame may name.
pub const MAX_DEVICES_PER_SEND: usize = 2048;
/// Longest group session id.
const MAX_SESSION_LEN: usize = 128;
/// The `keys_low` notice of a device is kept under this one id: a newer one replaces the
/// older, so a device is never told twice over.
const KEYS_LOW_ID: Uuid = Uuid::from_u128(1);

fn bad(message: impl Into<String>) -> Refusal {
    Refusal::bad_request(message)
}

/// Decodes base64 as Olm writes it (standard alphabet, padding optional).
fn decode(value: &str) -> Option<Vec<u8>> {
    let trimmed = value.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .ok()
}

/// A Curve25519 or Ed25519 public key: 32 bytes in base64.
fn check_key(value: &str, field: &str) -> Result<(), Refusal> {
    match decode(value) {
        Some(bytes) if bytes.len() == 32 => Ok(()),
        Some(bytes) => Err(bad(format!(
            "`{field}` is {} bytes, a public key is 32 (base64)",
            bytes.len()
        ))),
        None => Err(bad(format!("`{field}` is not base64"))),
    }
}

fn check_key_id(id: &str, field: &str) -> Result<(), Refusal> {
    let length = id.chars().count();
    if length == 0 || length > 64 {
        return Err(bad(format!("`{field}` ids must be 1-64 characters")));
    }
    Ok(())
}

/// A ciphertext: base64, not empty, within the body limit.
fn check_ciphertext(session: &Session, value: &str, field: &str) -> Result<(), Refusal> {
    let max = session.app.config.max_body_bytes;
    if value.len() > max {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("`{field}` is {} bytes, the limit is {max}", value.len()),
        ));
    }
    match decode(value) {
        Some(bytes) if !bytes.is_empty() => Ok(()),
        _ => Err(bad(format!(
            "`{field}` must be a non-empty base64 ciphertext"
        ))),
    }
}

fn check_device(user: &str, device: &str) -> Result<(), Refusal> {
    if !storage::is_valid_id(user) || !storage::is_valid_id(device) {
        return Err(bad(format!(
            "{user:?}/{device:?} is not a user and device id (1-64 characters of A-Z a-z 0-9 _ . @ -)"
        )));
    }
    Ok(())
}

fn check_olm_kind(kind: u8) -> Result<(), Refusal> {
    if kind > 1 {
        return Err(bad(format!(
            "`type` {kind}: an Olm message is 0 (pre-key) or 1 (normal)"
        )));
    }
    Ok(())
}

/// What pushes notices kept for devices' queues to those devices.
fn pushes_of(kept: &[(String, Uuid, Notice)]) -> Vec<(Vec<String>, Payload)> {
    kept.iter()
        .map(|(queue, id, notice)| {
            let payload = Payload::Notice {
                id: *id,
                notice: notice.clone(),
            };
            (vec![queue.clone()], payload)
        })
        .collect()
}

/// `keys_upload`: publishes this device's keys; returns its supply of one-time keys.
pub async fn upload(
    session: &Session,
    identity_key: String,
    signing_key: String,
    one_time_keys: Vec<KeyView>,
    fallback_key: Option<KeyView>,
) -> Result<usize, Refusal> {
    check_key(&identity_key, "identity_key")?;
    check_key(&signing_key, "signing_key")?;
    if one_time_keys.len() > MAX_KEYS_PER_UPLOAD {
        return Err(bad(format!(
            "`one_time_keys` takes at most {MAX_KEYS_PER_UPLOAD} keys per upload"
        )));
    }
    let mut ids = BTreeSet::new();
    for key in &one_time_keys {
        check_key_id(&key.id, "one_time_keys")?;
        check_key(&key.key, "one_time_keys")?;
        if !ids.insert(&key.id) {
            return Err(bad(format!("`one_time_keys`: id {:?} twice", key.id)));
        }
    }
    if let Some(key) = &fallback_key {
        check_key_id(&key.id, "fallback_key")?;
        check_key(&key.key, "fallback_key")?;
    }
    let conn = &session.conn;
    let keys = DeviceKeys {
        identity_key,
        signing_key,
    };
    let one_time = one_time_keys
        .into_iter()
        .map(|k| OneTimeKey {
            id: k.id,
            key: k.key,
        })
        .collect();
    let fallback = fallback_key.map(|k| OneTimeKey {
        id: k.id,
        key: k.key,
    });
    let store = &session.app.store;
    let count = session
        .call(store.publish_keys(&conn.user, &conn.device, keys, one_time, fallback))
        .await?;
    if count >= LOW_KEYS {
        // A `keys_low` still kept for this device is out of date: withdrawn, so that the
        // next connect does not ask for keys it has. Best effort, like the notice.
        let notice = [(device_address(&conn.user, &conn.device), KEYS_LOW_ID)];
        if let Err(e) = session.call(store.drop_notices(&notice)).await {
            tracing::warn!(error = %e.message, "withdrawing a keys_low notice failed");
        }
    }
    Ok(count)
}

/// `keys_claim`: one key per named device (devices without keys are left out); a device
/// whose supply runs low is told so.
pub async fn claim(
    session: &Session,
    devices: Vec<DeviceRef>,
) -> Result<Vec<ClaimedView>, Refusal> {
    if devices.is_empty() || devices.len() > MAX_CLAIMS {
        return Err(bad(format!("`devices` takes 1-{MAX_CLAIMS} devices")));
    }
    for d in &devices {
        check_device(&d.user, &d.device)?;
    }
    let devices: BTreeSet<DeviceRef> = devices.into_iter().collect();
    let claims = u32::try_from(devices.len()).unwrap_or(u32::MAX);
    if !session.app.claims.allow(&session.conn.user, claims) {
        let config = &session.app.config;
        return Err(Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} one-time keys claimed per second (burst {}): claim keys only \
                 for devices you have no session with, and wait",
                config.key_claims_per_sec, config.key_claim_burst
            ),
        ));
    }
    let store = &session.app.store;
    let claimed = session
        .call(futures_util::future::try_join_all(
            devices.iter().map(|d| store.claim_key(&d.user, &d.device)),
        ))
        .await?;
    let claimed: Vec<_> = claimed.into_iter().flatten().collect();
    let low: Vec<(String, Uuid, Notice)> = claimed
        .iter()
        .filter(|c| c.remaining < LOW_KEYS)
        .map(|c| {
            let queue = device_address(&c.device.user, &c.device.device);
            let notice = Notice::KeysLow {
                remaining: c.remaining,
            };
            (queue, KEYS_LOW_ID, notice)
        })
        .collect();
    if !low.is_empty() {
        // Best effort: the keys are handed out whatever happens to the notice.
        let pushes = pushes_of(&low);
        let told = async {
            session.call(store.push_notices(low)).await?;
            session.push_to_queues(pushes).await
        };
        if let Err(e) = told.await {
            tracing::warn!(error = %e.message, "telling devices their keys run low failed");
        }
    }
    Ok(claimed.iter().map(ClaimedView::from).collect())
}

/// `to_device`: keeps each message for its device until that device confirms it (synced,
/// like a message), and pushes it to the device if it is online.
pub async fn to_devices(session: &Session, messages: Vec<ToDeviceSend>) -> Result<(), Refusal> {
    if messages.is_empty() || messages.len() > MAX_DEVICES_PER_SEND {
        return Err(bad(format!(
            "`messages` takes 1-{MAX_DEVICES_PER_SEND} messages"
        )));
    }
    for m in &messages {
        check_device(&m.user, &m.device)?;
        check_olm_kind(m.kind)?;
        check_ciphertext(session, &m.ciphertext, "ciphertext")?;
        if let Some(identity) = &m.identity_key {
            check_key(identity, "identity_key")?;
        }
    }
    let named: BTreeSet<(&str, &str)> = messages
        .iter()
        .map(|m| (m.user.as_str(), m.device.as_str()))
        .collect();
    let users: Vec<String> = named
        .iter()
        .map(|(u, _)| (*u).to_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let known = session.call(session.app.store.devices(&users)).await?;
    let identities = identities_of(&known);
    let unknown: Vec<String> = named
        .iter()
        .filter(|device| !identities.contains_key(*device))
        .map(|(u, d)| format!("{u}/{d}"))
        .collect();
    if !unknown.is_empty() {
        return Err(Refusal::new(
            ErrorCode::NotFound,
            format!("no device with keys: {}", unknown.join(", ")),
        ));
    }
    let believed = messages.iter().filter_map(|m| {
        let identity = m.identity_key.clone()?;
        let device = DeviceRef {
            user: m.user.clone(),
            device: m.device.clone(),
        };
        Some((device, identity))
    });
    let changed = changed_identities(&identities, believed.collect());
    if !changed.is_empty() {
        let mut refusal = Refusal::new(
            ErrorCode::DeviceMismatch,
            format!(
                "{} of these devices have a new identity: start a new session with them \
                 and send again",
                changed.len()
            ),
        );
        refusal.devices = Some(Box::new(Mismatch {
            changed,
            ..Mismatch::default()
        }));
        return Err(refusal);
    }
    let conn = &session.conn;
    let count = u32::try_from(messages.len()).unwrap_or(u32::MAX);
    if !session.app.to_device.allow(&conn.user, count) {
        let config = &session.app.config;
        return Err(Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} to-device messages per second (burst {}): nothing was sent; \
                 send them again later",
                config.to_device_per_sec, config.to_device_burst
            ),
        ));
    }
    // An id per message, in the frame's order (ids of one process grow): several for one
    // device are kept side by side and arrive in that order.
    let kept: Vec<(String, Uuid, Notice)> = messages
        .into_iter()
        .map(|m| {
            let id = Uuid::now_v7();
            let notice = Notice::ToDevice(ToDevice {
                from: conn.user.clone(),
                from_device: conn.device.clone(),
                olm: OlmCiphertext {
                    kind: m.kind,
                    ciphertext: m.ciphertext,
                },
                ts: storage::ts_of(id),
            });
            (device_address(&m.user, &m.device), id, notice)
        })
        .collect();
    let pushes = pushes_of(&kept);
    session.call(session.app.store.push_notices(kept)).await?;
    // Kept: a device that is not reached now gets it on its next connect.
    if let Err(e) = session.push_to_queues(pushes).await {
        tracing::debug!(error = %e.message, "pushing to-device messages failed");
    }
    Ok(())
}

/// Each device's identity key, by `(user, device)`.
fn identities_of(devices: &[Device]) -> HashMap<(&str, &str), &str> {
    devices
        .iter()
        .map(|d| {
            (
                (d.user.as_str(), d.device.as_str()),
                d.keys.identity_key.as_str(),
            )
        })
        .collect()
}

/// The devices named with an identity key (`identity_key` of a send's device) that is not
/// the one they have now (`identities`, from [`identities_of`]): set up again under the
/// same id since the sender learnt it. Each once, in order.
fn changed_identities(
    identities: &HashMap<(&str, &str), &str>,
    believed: Vec<(DeviceRef, String)>,
) -> Vec<DeviceRef> {
    let changed: BTreeSet<DeviceRef> = believed
        .into_iter()
        .filter(|(d, identity)| {
            // Compared as bytes: base64 padding is optional.
            identities
                .get(&(d.user.as_str(), d.device.as_str()))
                .is_some_and(|now| decode(now) != decode(identity))
        })
        .map(|(d, _)| d)
        .collect();
    changed.into_iter().collect()
}

/// Checks an encrypted send against the conversation's devices now: every device of every
/// member (the sender's other devices included, the sending one not) must be named, and
/// nothing else; direct messages carry an Olm ciphertext per device, group messages one
/// Megolm ciphertext. A mismatch is refused with both lists (`device_mismatch`).
pub async fn check_send(
    session: &Session,
    conversation: &Conversation,
    group: Option<&Group>,
    send: E2eeSend,
) -> Result<E2ee, Refusal> {
    let conn = &session.conn;
    if send.to.len() > MAX_DEVICES_PER_SEND {
        return Err(bad(format!(
            "`e2ee.to` takes at most {MAX_DEVICES_PER_SEND} devices"
        )));
    }
    let mut to = Vec::with_capacity(send.to.len());
    let mut named = BTreeSet::new();
    let mut believed = Vec::new();
    for d in send.to {
        check_device(&d.user, &d.device)?;
        if !named.insert(DeviceRef {
            user: d.user.clone(),
            device: d.device.clone(),
        }) {
            return Err(bad(format!(
                "`e2ee.to` names {}/{} twice",
                d.user, d.device
            )));
        }
        let olm = match (&send.group, d.kind, d.ciphertext) {
            (None, Some(kind), Some(ciphertext)) => {
                check_olm_kind(kind)?;
                check_ciphertext(session, &ciphertext, "e2ee.to.ciphertext")?;
                Some(OlmCiphertext { kind, ciphertext })
            }
            (None, _, _) => {
                return Err(bad(
                    "each device of `e2ee.to` needs `type` and `ciphertext` (or give `e2ee.group`)",
                ))
            }
            (Some(_), None, None) => None,
            (Some(_), _, _) => return Err(bad(
                "a group message has one ciphertext (`e2ee.group`): `e2ee.to` only names devices",
            )),
        };
        if let Some(identity) = d.identity_key {
            check_key(&identity, "e2ee.to.identity_key")?;
            believed.push((
                DeviceRef {
                    user: d.user.clone(),
                    device: d.device.clone(),
                },
                identity,
            ));
        }
        to.push(ForDevice {
            user: d.user,
            device: d.device,
            olm,
        });
    }
    let group_ciphertext = match send.group {
        Some(g) => {
            if conversation.group_id().is_none() {
                return Err(bad(
                    "`e2ee.group` is for groups: a direct message has a ciphertext per device",
                ));
            }
            let length = g.session.chars().count();
            if length == 0 || length > MAX_SESSION_LEN {
                return Err(bad(format!(
                    "`e2ee.group.session` must be 1-{MAX_SESSION_LEN} characters"
                )));
            }
            check_ciphertext(session, &g.ciphertext, "e2ee.group.ciphertext")?;
            Some(GroupCiphertext {
                session: g.session,
                ciphertext: g.ciphertext,
            })
        }
        None => None,
    };
    let members: Vec<String> = match (conversation, group) {
        (_, Some(group)) => group.members.iter().cloned().collect(),
        (Conversation::Direct(a, b), None) => {
            let mut users = vec![a.clone(), b.clone()];
            users.dedup();
            users
        }
        (Conversation::Group(_), None) => Vec::new(),
    };
    let current = session.call(session.app.store.devices(&members)).await?;
    if !current
        .iter()
        .any(|d| d.user == conn.user && d.device == conn.device)
    {
        return Err(bad(
            "this device has published no keys: send `keys_upload` before encrypted messages",
        ));
    }
    if let Some(peer) = conversation.peer_of(&conn.user) {
        if peer != conn.user && !current.iter().any(|d| d.user == peer) {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                format!("{peer} has no device with keys: they cannot receive encrypted messages"),
            ));
        }
    }
    let changed = changed_identities(&identities_of(&current), believed);
    let expected: BTreeSet<DeviceRef> = current
        .into_iter()
        .filter(|d| !(d.user == conn.user && d.device == conn.device))
        .map(|d| DeviceRef {
            user: d.user,
            device: d.device,
        })
        .collect();
    let mismatch = Mismatch {
        missing: expected.difference(&named).cloned().collect(),
        stale: named.difference(&expected).cloned().collect(),
        changed,
    };
    if !mismatch.is_empty() {
        let mut refusal = Refusal::new(
            ErrorCode::DeviceMismatch,
            format!(
                "the devices of this conversation changed: {} missing, {} stale, {} with a \
                 new identity; encrypt for the current ones and send again with the same \
                 client_msg_id",
                mismatch.missing.len(),
                mismatch.stale.len(),
                mismatch.changed.len()
            ),
        );
        refusal.devices = Some(Box::new(mismatch));
        return Err(refusal);
    }
    Ok(E2ee {
        device: conn.device.clone(),
        to,
        group: group_ciphertext,
    })
}
