//! The reference client's end-to-end encryption, on vodozemac (Matrix's Olm and Megolm):
//! one device's keys and sessions, and the frames of docs/protocol.md "End-to-end
//! encryption" that go with them. No I/O: callers send the frames it builds and hand it
//! the frames they receive.
//!
//! - Each device has an Olm account: a Curve25519 identity key, an Ed25519 signing key,
//!   one-time keys and a fallback key, published with `keys_upload`.
//! - A direct message is encrypted once per device (the recipient's and the sender's other
//!   ones) in the Olm session with that device, started from a key claimed with
//!   `keys_claim` (a pre-key message) or by the other side.
//! - A group message is encrypted once, in the sender's Megolm session for the group,
//!   whose key goes to every member device first as a to-device message (Olm); a new
//!   session is started whenever the group's devices change, so that a member added later
//!   cannot read what came before and a removed one cannot read what comes after.

use std::collections::{BTreeSet, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use vodozemac::megolm::{GroupSession, InboundGroupSession, MegolmMessage, SessionKey};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};
use vodozemac::Curve25519PublicKey;

/// A device, as `user/device`.
pub type DeviceId = (String, String);

/// One-time keys published at a time.
pub const KEYS_PER_UPLOAD: usize = 50;

/// A device's end-to-end encryption state.
pub struct E2eeDevice {
    pub user: String,
    pub device: String,
    account: Account,
    /// Olm sessions by peer device, the one to encrypt with first.
    sessions: HashMap<DeviceId, Vec<Session>>,
    /// The identity key of the peer of the first of each device's sessions: sends name
    /// it, so that the server refuses them (`changed`) once that device has a new one.
    session_identities: HashMap<DeviceId, Curve25519PublicKey>,
    /// Identity keys of peer devices, from `devices` and `keys_claimed` answers.
    identities: HashMap<DeviceId, Curve25519PublicKey>,
    /// This device's Megolm session per group, with the devices its key went to.
    outbound: HashMap<String, (GroupSession, BTreeSet<DeviceId>)>,
    /// Group sessions others shared with this device, by session id.
    inbound: HashMap<String, InboundGroupSession>,
}

fn b64(bytes: &[u8]) -> String {
    vodozemac::base64_encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>> {
    vodozemac::base64_decode(text).map_err(|e| anyhow!("base64: {e}"))
}

fn text(value: &Value, field: &str) -> Result<String> {
    value
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("`{field}` missing in {value}"))
}

impl E2eeDevice {
    pub fn new(user: &str, device: &str) -> Self {
        E2eeDevice {
            user: user.to_owned(),
            device: device.to_owned(),
            account: Account::new(),
            sessions: HashMap::new(),
            session_identities: HashMap::new(),
            identities: HashMap::new(),
            outbound: HashMap::new(),
            inbound: HashMap::new(),
        }
    }

    pub fn id(&self) -> DeviceId {
        (self.user.clone(), self.device.clone())
    }

    /// This device's Curve25519 identity key (what its `devices` entry shows).
    pub fn identity_key(&self) -> String {
        self.account.curve25519_key().to_base64()
    }

    /// A `keys_upload` frame with `count` new one-time keys and a new fallback key.
    pub fn keys_upload(&mut self, reference: &str, count: usize) -> Value {
        self.account.generate_one_time_keys(count);
        self.account.generate_fallback_key();
        let one_time: Vec<Value> = self
            .account
            .one_time_keys()
            .into_iter()
            .map(|(id, key)| json!({"id": id.to_base64(), "key": key.to_base64()}))
            .collect();
        let fallback = self
            .account
            .fallback_key()
            .into_iter()
            .next()
            .map(|(id, key)| json!({"id": id.to_base64(), "key": key.to_base64()}));
        self.account.mark_keys_as_published();
        let keys = self.account.identity_keys();
        json!({
            "type": "keys_upload",
            "ref": reference,
            "identity_key": keys.curve25519.to_base64(),
            "signing_key": keys.ed25519.to_base64(),
            "one_time_keys": one_time,
            "fallback_key": fallback,
        })
    }

    /// Learns the identity keys of a `devices` answer; returns the devices listed.
    pub fn learn_devices(&mut self, answer: &Value) -> Result<Vec<DeviceId>> {
        let mut out = Vec::new();
        for d in answer
            .get("devices")
            .and_then(Value::as_array)
            .context("`devices` answer without devices")?
        {
            let id = (text(d, "user")?, text(d, "device")?);
            let key = Curve25519PublicKey::from_base64(&text(d, "identity_key")?)?;
            self.identities.insert(id.clone(), key);
            out.push(id);
        }
        Ok(out)
    }

    /// Of these devices, those this one has no Olm session with yet (claim a key for them).
    pub fn without_session(&self, devices: &[DeviceId]) -> Vec<DeviceId> {
        devices
            .iter()
            .filter(|d| **d != self.id() && !self.sessions.contains_key(*d))
            .cloned()
            .collect()
    }

    /// Starts an Olm session with each device of a `keys_claimed` answer.
    pub fn start_sessions(&mut self, answer: &Value) -> Result<()> {
        for k in answer
            .get("keys")
            .and_then(Value::as_array)
            .context("`keys_claimed` answer without keys")?
        {
            let id = (text(k, "user")?, text(k, "device")?);
            let identity = Curve25519PublicKey::from_base64(&text(k, "identity_key")?)?;
            let Some(one_time) = k.get("one_time_key").filter(|v| !v.is_null()) else {
                continue;
            };
            let one_time = Curve25519PublicKey::from_base64(&text(one_time, "key")?)?;
            let session = self.account.create_outbound_session(
                SessionConfig::version_1(),
                identity,
                one_time,
            )?;
            self.identities.insert(id.clone(), identity);
            self.session_identities.insert(id.clone(), identity);
            self.sessions.entry(id).or_default().insert(0, session);
        }
        Ok(())
    }

    /// Forgets the sessions with devices that were set up again under the same id (the
    /// `changed` of a `device_mismatch`), and every group session shared with them: the
    /// next send claims a key and starts anew.
    pub fn identities_changed(&mut self, devices: &[DeviceId]) {
        for d in devices {
            self.sessions.remove(d);
            self.session_identities.remove(d);
            self.identities.remove(d);
        }
        self.outbound
            .retain(|_, (_, shared)| devices.iter().all(|d| !shared.contains(d)));
    }

    /// A device of a frame's `e2ee.to` or `to_device` messages, with the identity key of
    /// the session this device encrypts for it in.
    fn addressed(&self, d: &DeviceId) -> Value {
        let mut to = json!({"user": d.0, "device": d.1});
        if let Some(identity) = self.session_identities.get(d) {
            to["identity_key"] = json!(identity.to_base64());
        }
        to
    }

    /// Encrypts `plaintext` for one device in the Olm session with it.
    fn olm_encrypt(&mut self, to: &DeviceId, plaintext: &str) -> Result<(usize, String)> {
        let session = self
            .sessions
            .get_mut(to)
            .and_then(|s| s.first_mut())
            .ok_or_else(|| anyhow!("no Olm session with {}/{}", to.0, to.1))?;
        let (kind, bytes) = session.encrypt(plaintext)?.to_parts();
        Ok((kind, b64(&bytes)))
    }

    /// The `e2ee` of a direct `send`: a ciphertext for each of `devices` (every device of
    /// the recipient and this user's other devices), which need sessions.
    pub fn encrypt_direct(&mut self, devices: &[DeviceId], plaintext: &str) -> Result<Value> {
        let mut to = Vec::with_capacity(devices.len());
        let me = self.id();
        for d in devices.iter().filter(|d| **d != me) {
            let (kind, ciphertext) = self.olm_encrypt(d, plaintext)?;
            let mut item = self.addressed(d);
            item["type"] = json!(kind);
            item["ciphertext"] = json!(ciphertext);
            to.push(item);
        }
        Ok(json!({ "to": to }))
    }

    /// Decrypts an Olm message from a device, starting the session on a pre-key message.
    fn olm_decrypt(&mut self, from: &DeviceId, kind: u64, ciphertext: &str) -> Result<String> {
        let message = OlmMessage::from_parts(kind as usize, &unb64(ciphertext)?)?;
        if let Some(sessions) = self.sessions.get_mut(from) {
            for session in sessions.iter_mut() {
                if let Ok(plaintext) = session.decrypt(&message) {
                    return Ok(String::from_utf8(plaintext)?);
                }
            }
        }
        let OlmMessage::PreKey(pre_key) = &message else {
            bail!(
                "an Olm message from {}/{} in no known session",
                from.0,
                from.1
            );
        };
        if let Some(known) = self.identities.get(from) {
            if *known != pre_key.identity_key() {
                bail!(
                    "{}/{} used an identity key it did not publish",
                    from.0,
                    from.1
                );
            }
        }
        let created = self.account.create_inbound_session(
            SessionConfig::version_1(),
            pre_key.identity_key(),
            pre_key,
        )?;
        self.identities.insert(from.clone(), pre_key.identity_key());
        self.session_identities
            .insert(from.clone(), pre_key.identity_key());
        // The session the other side started is the one both use from now on.
        self.sessions
            .entry(from.clone())
            .or_default()
            .insert(0, created.session);
        Ok(String::from_utf8(created.plaintext)?)
    }

    /// The to-device messages that give this device's group session for `conversation`
    /// to `devices` (every member device but this one): a new session when the devices
    /// changed since the last one was shared, else `None` (the current one is shared).
    /// The devices need Olm sessions.
    pub fn share_group_key(
        &mut self,
        conversation: &str,
        devices: &[DeviceId],
    ) -> Result<Option<Value>> {
        let wanted: BTreeSet<DeviceId> = devices
            .iter()
            .filter(|d| **d != self.id())
            .cloned()
            .collect();
        if self
            .outbound
            .get(conversation)
            .is_some_and(|(_, shared)| *shared == wanted)
        {
            return Ok(None);
        }
        let session = GroupSession::new(Default::default());
        let key = json!({
            "room_key": {
                "conversation": conversation,
                "session": session.session_id(),
                "key": session.session_key().to_base64(),
            }
        })
        .to_string();
        let mut messages = Vec::with_capacity(wanted.len());
        for d in &wanted {
            let (kind, ciphertext) = self.olm_encrypt(d, &key)?;
            let mut message = self.addressed(d);
            message["type"] = json!(kind);
            message["ciphertext"] = json!(ciphertext);
            messages.push(message);
        }
        // This device reads its own group messages too.
        let own = InboundGroupSession::new(&session.session_key(), Default::default());
        self.inbound.insert(session.session_id(), own);
        self.outbound
            .insert(conversation.to_owned(), (session, wanted));
        if messages.is_empty() {
            return Ok(None);
        }
        Ok(Some(json!({"type": "to_device", "messages": messages})))
    }

    /// The `e2ee` of a group `send`, in the session last shared for `conversation`.
    pub fn encrypt_group(&mut self, conversation: &str, plaintext: &str) -> Result<Value> {
        let (session, shared) = self
            .outbound
            .get_mut(conversation)
            .ok_or_else(|| anyhow!("no group session for {conversation}: share one first"))?;
        let ciphertext = session.encrypt(plaintext).to_base64();
        let shared = shared.clone();
        let session_id = session.session_id();
        let to: Vec<Value> = shared.iter().map(|d| self.addressed(d)).collect();
        Ok(json!({
            "to": to,
            "group": {"session": session_id, "ciphertext": ciphertext},
        }))
    }

    /// Takes a `to_device` frame: a group session key is kept for its group's messages.
    pub fn receive_to_device(&mut self, frame: &Value) -> Result<()> {
        let from = text(frame, "from")?;
        let e2ee = frame.get("e2ee").context("`to_device` without `e2ee`")?;
        let from = (from, text(e2ee, "device")?);
        let kind = e2ee.get("type").and_then(Value::as_u64).unwrap_or(1);
        let plaintext = self.olm_decrypt(&from, kind, &text(e2ee, "ciphertext")?)?;
        let content: Value = serde_json::from_str(&plaintext)?;
        if let Some(key) = content.get("room_key") {
            let session_key = SessionKey::from_base64(&text(key, "key")?)?;
            let inbound = InboundGroupSession::new(&session_key, Default::default());
            self.inbound.insert(inbound.session_id(), inbound);
        }
        Ok(())
    }

    /// Whether a group message's session is known here (its key arrived).
    pub fn can_decrypt(&self, frame: &Value) -> bool {
        match frame
            .get("e2ee")
            .and_then(|e| e.get("session"))
            .and_then(Value::as_str)
        {
            Some(session) => self.inbound.contains_key(session),
            None => true,
        }
    }

    /// Decrypts a `message` frame (live, replayed, or a `history` item) for this device.
    pub fn decrypt(&mut self, frame: &Value) -> Result<String> {
        let e2ee = frame
            .get("e2ee")
            .ok_or_else(|| anyhow!("not an end-to-end encrypted message: {frame}"))?;
        let ciphertext = e2ee
            .get("ciphertext")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("the message was not encrypted for this device"))?;
        if let Some(session) = e2ee.get("session").and_then(Value::as_str) {
            let inbound = self
                .inbound
                .get_mut(session)
                .ok_or_else(|| anyhow!("no key for group session {session}"))?;
            let decrypted = inbound.decrypt(&MegolmMessage::from_base64(ciphertext)?)?;
            return Ok(String::from_utf8(decrypted.plaintext)?);
        }
        let from = (text(frame, "from")?, text(e2ee, "device")?);
        let kind = e2ee.get("type").and_then(Value::as_u64).unwrap_or(1);
        self.olm_decrypt(&from, kind, ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(of: &mut E2eeDevice) -> Value {
        let upload = of.keys_upload("r", 1);
        let key = upload["one_time_keys"][0].clone();
        json!({"keys": [{
            "user": of.user, "device": of.device,
            "identity_key": upload["identity_key"], "signing_key": upload["signing_key"],
            "one_time_key": key, "fallback": false,
        }]})
    }

    #[test]
    fn two_devices_talk_and_a_third_cannot_listen() {
        let mut alice = E2eeDevice::new("alice", "phone");
        let mut bob = E2eeDevice::new("bob", "phone");
        let mut eve = E2eeDevice::new("bob", "later");
        alice.start_sessions(&claimed(&mut bob)).expect("session");
        let bob_id = bob.id();
        let e2ee = alice
            .encrypt_direct(std::slice::from_ref(&bob_id), "hello bob")
            .expect("encrypt");
        let mut frame = json!({"from": "alice", "e2ee": {"device": "phone"}});
        frame["e2ee"]["type"] = e2ee["to"][0]["type"].clone();
        frame["e2ee"]["ciphertext"] = e2ee["to"][0]["ciphertext"].clone();
        assert_eq!(bob.decrypt(&frame).expect("bob reads it"), "hello bob");
        assert!(
            eve.decrypt(&frame).is_err(),
            "another device read bob's ciphertext"
        );
    }
}
