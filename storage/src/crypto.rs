//! Encryption of message bodies at rest with XChaCha20-Poly1305.
//!
//! A sealed body is `[version=1][key id: u32 BE][nonce: 24 bytes][ciphertext + tag]`. The
//! nonce is random per message (XChaCha's 192-bit nonces make random nonces safe). The
//! associated data binds the ciphertext to its message id, conversation and sender, so a
//! body copied onto another row fails to decrypt instead of showing the wrong text.
//!
//! Keys come from a key ring: entries of `<key id>:<64 hex chars>`, one per line (or comma
//! separated), and optionally `primary=<key id>` naming the key that seals new messages;
//! without it the **last** entry is the primary. The other keys only decrypt. An unknown
//! key id is an error, never garbage.
//!
//! Rotation (docs/operations.md, "Rotating the at-rest key"): add a key without making it
//! primary ([`add_key`]), reload every process, make it primary ([`set_primary`]), reload,
//! re-encrypt the old rows (`MessageStore::reencrypt`), then retire the old key
//! ([`remove_key`]). A [`Keyring`] is a shared handle: [`Keyring::reload`] swaps the keys
//! under every clone at once, so a store picks up a new ring without restarting.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use uuid::Uuid;

use crate::error::{Error, Result};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 24;

/// Where the key ring comes from, in order of preference.
#[derive(Clone, Debug, Default)]
pub enum KeySource {
    /// A key file (`STORAGE_KEYS_FILE`).
    File(PathBuf),
    /// The key ring itself, lines or comma separated (`STORAGE_KEYS`).
    Inline(String),
    /// A development key generated into (and then read from) `<data dir>/dev-keys`.
    #[default]
    DevGenerated,
}

/// The encryption keys, by id, and which one seals new messages: a cheap-clone handle
/// whose clones share one ring, replaced whole by [`Keyring::reload`].
#[derive(Clone)]
pub struct Keyring {
    ring: Arc<ArcSwap<Ring>>,
    /// The file it was read from, if any: what a reload reads again.
    file: Option<PathBuf>,
}

/// One version of the ring.
struct Ring {
    primary: u32,
    ciphers: HashMap<u32, XChaCha20Poly1305>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keyring")
            .field("primary", &self.primary())
            .field("key_ids", &self.key_ids())
            .field("file", &self.file)
            .finish()
    }
}

/// One entry of a key ring's text.
enum Entry<'a> {
    Key { id: u32, hex: &'a str },
    Primary(u32),
}

/// The entries of a key ring's text, each with its 1-based position; `#` starts a comment.
fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split(['\n', ','])
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(n, l)| (n + 1, l))
}

fn parse_entry(n: usize, entry: &str) -> Result<Entry<'_>> {
    if let Some(id) = entry.strip_prefix("primary") {
        let id = id
            .trim_start()
            .strip_prefix('=')
            .ok_or_else(|| Error::Keys(format!("entry {n}: expected primary=<key id>")))?;
        let id = id.trim().parse().map_err(|_| {
            Error::Keys(format!(
                "entry {n}: primary key id {:?} is not a number",
                id.trim()
            ))
        })?;
        return Ok(Entry::Primary(id));
    }
    let (id, hex) = entry
        .split_once(':')
        .ok_or_else(|| Error::Keys(format!("entry {n}: expected <key id>:<64 hex chars>")))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| Error::Keys(format!("entry {n}: key id {id:?} is not a number")))?;
    Ok(Entry::Key {
        id,
        hex: hex.trim(),
    })
}

impl Ring {
    fn parse(text: &str) -> Result<Ring> {
        let mut ciphers = HashMap::new();
        let mut last = None;
        let mut named = None;
        for (n, entry) in entries(text) {
            let (id, hex_key) = match parse_entry(n, entry)? {
                Entry::Primary(id) => {
                    if named.replace(id).is_some() {
                        return Err(Error::Keys("primary= appears twice".into()));
                    }
                    continue;
                }
                Entry::Key { id, hex } => (id, hex),
            };
            let bytes = hex::decode(hex_key)
                .map_err(|_| Error::Keys(format!("entry {n}: key {id} is not hexadecimal")))?;
            if bytes.len() != 32 {
                return Err(Error::Keys(format!(
                    "entry {n}: key {id} has {} bytes, expected 32 (64 hex chars)",
                    bytes.len()
                )));
            }
            if ciphers
                .insert(id, XChaCha20Poly1305::new(Key::from_slice(&bytes)))
                .is_some()
            {
                return Err(Error::Keys(format!("key id {id} appears twice")));
            }
            last = Some(id);
        }
        let last = last.ok_or_else(|| Error::Keys("the key ring is empty".into()))?;
        let primary = named.unwrap_or(last);
        if !ciphers.contains_key(&primary) {
            return Err(Error::Keys(format!(
                "primary={primary} names a key that is not in the ring"
            )));
        }
        Ok(Ring { primary, ciphers })
    }
}

impl Keyring {
    /// Parses a key ring's text: `<id>:<hex>` entries and an optional `primary=<id>`,
    /// separated by newlines or commas; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(Keyring {
            ring: Arc::new(ArcSwap::from_pointee(Ring::parse(text)?)),
            file: None,
        })
    }

    /// Loads the key ring from its source; a development ring is generated on first use.
    pub fn load(source: &KeySource, data_dir: &Path) -> Result<Self> {
        match source {
            KeySource::File(path) => {
                let mut ring = Self::parse(&read_key_file(path)?)?;
                ring.file = Some(path.clone());
                Ok(ring)
            }
            KeySource::Inline(text) => Self::parse(text),
            KeySource::DevGenerated => {
                let path = data_dir.join("dev-keys");
                if !path.exists() {
                    let key = XChaCha20Poly1305::generate_key(&mut OsRng);
                    let line = format!(
                        "# development key generated by the gateway; use a real key file in production\n1:{}\n",
                        hex::encode(key)
                    );
                    write_private(&path, &line)?;
                    tracing::warn!(path = %path.display(), "generated a development encryption key");
                }
                Self::load(&KeySource::File(path), data_dir)
            }
        }
    }

    /// The key file this ring is read from; `None` for a ring given inline.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Reads the key file again and, if it parses, puts its ring in place of this one for
    /// every clone; returns whether anything changed. A ring given inline has nothing to
    /// read again. A file that does not parse changes nothing and is the error.
    pub fn reload(&self) -> Result<bool> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let fresh = Ring::parse(&read_key_file(path)?)?;
        let current = self.ring.load();
        let mut ids: Vec<_> = fresh.ciphers.keys().copied().collect();
        ids.sort_unstable();
        let changed = fresh.primary != current.primary || ids != self.key_ids();
        self.ring.store(Arc::new(fresh));
        if changed {
            tracing::info!(primary = self.primary(), key_ids = ?ids, file = %path.display(), "key ring reloaded");
        }
        Ok(changed)
    }

    /// Puts `other`'s current keys in place of this ring's, for every clone (tests, and a
    /// ring given some other way than a file).
    pub fn replace_with(&self, other: &Keyring) {
        self.ring.store(other.ring.load_full());
    }

    /// The id of the key that seals new messages.
    pub fn primary(&self) -> u32 {
        self.ring.load().primary
    }

    /// The ids of every key in the ring, ascending.
    pub fn key_ids(&self) -> Vec<u32> {
        let mut ids: Vec<_> = self.ring.load().ciphers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The id of the key a sealed body was sealed with, read from its header.
    pub fn sealed_with(sealed: &[u8]) -> Option<u32> {
        match sealed {
            [VERSION, a, b, c, d, ..] if sealed.len() >= HEADER => {
                Some(u32::from_be_bytes([*a, *b, *c, *d]))
            }
            _ => None,
        }
    }

    /// Encrypts a body for the given message, conversation and sender.
    pub fn seal(&self, id: Uuid, conversation: &str, from: &str, body: &[u8]) -> Result<Vec<u8>> {
        let ring = self.ring.load();
        let cipher = ring
            .ciphers
            .get(&ring.primary)
            .ok_or(Error::UnknownKey(id, ring.primary))?;
        // A thread-local CSPRNG (ChaCha, seeded and reseeded from the OS): a 192-bit random
        // nonce without a system call per message.
        let nonce = XChaCha20Poly1305::generate_nonce(&mut rand::thread_rng());
        let aad = associated_data(id, conversation, from);
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Backend(format!("encrypting message {id} failed")))?;
        let mut out = Vec::with_capacity(HEADER + ciphertext.len());
        out.push(VERSION);
        out.extend_from_slice(&ring.primary.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Decrypts a stored message body into the [`Message`](crate::Message) it belongs to (both stores
    /// keep `from` and the sealed body beside the row's id and conversation).
    pub fn open_message(
        &self,
        id: Uuid,
        conversation: &str,
        from: String,
        sealed: &[u8],
    ) -> Result<crate::model::Message> {
        let content = self.open(id, conversation, &from, sealed)?;
        let conversation = conversation
            .parse()
            .map_err(|e| Error::Backend(format!("stored message {id}: {e}")))?;
        crate::model::Message::from_content(id, conversation, from, content)
    }

    /// Decrypts a sealed body; fails if anything it is bound to was changed.
    pub fn open(&self, id: Uuid, conversation: &str, from: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let key_id = Self::sealed_with(sealed).ok_or(Error::Decrypt(id))?;
        let ring = self.ring.load();
        let cipher = ring
            .ciphers
            .get(&key_id)
            .ok_or(Error::UnknownKey(id, key_id))?;
        let nonce = XNonce::from_slice(&sealed[5..HEADER]);
        let aad = associated_data(id, conversation, from);
        cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[HEADER..],
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Decrypt(id))
    }

    /// Seals `sealed`'s body again with the primary key; `None` when it already is.
    pub fn reseal(
        &self,
        id: Uuid,
        conversation: &str,
        from: &str,
        sealed: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        if Self::sealed_with(sealed) == Some(self.primary()) {
            return Ok(None);
        }
        let body = self.open(id, conversation, from, sealed)?;
        self.seal(id, conversation, from, &body).map(Some)
    }
}

impl Keyring {
    /// Reads the key file again on SIGHUP, and when its modification time changes (checked
    /// every `poll`; zero: only on SIGHUP), until `stop`. Every process that seals or opens
    /// messages runs this, so a rotation needs no restart. A file that does not parse
    /// keeps the ring in use, and says so in the log and in
    /// `storage_key_reloads_total{result="failed"}`.
    pub fn reload_on_change(
        &self,
        poll: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        let Some(path) = self.file.clone() else {
            return Ok(());
        };
        let keys = self.clone();
        metrics::gauge!("storage_key_primary").set(f64::from(keys.primary()));
        crate::watch::on_change(vec![path], poll, stop, move |why| {
            // Counted and logged there; the ring in use stays on failure.
            let _ = keys.reload_logged(why);
        })
    }

    /// [`Keyring::reload`], counted in `storage_key_reloads_total` and logged with `why`.
    pub fn reload_logged(&self, why: &str) -> Result<bool> {
        let result = self.reload();
        match &result {
            Ok(_) => {
                metrics::counter!("storage_key_reloads_total", "result" => "ok").increment(1);
                metrics::gauge!("storage_key_primary").set(f64::from(self.primary()));
            }
            Err(e) => {
                metrics::counter!("storage_key_reloads_total", "result" => "failed").increment(1);
                tracing::error!(error = %e, why, "key ring not reloaded: the one in use stays");
            }
        }
        result
    }
}

fn read_key_file(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Appends a new random key to a key ring's text **without** making it primary (the ring
/// gains `primary=<the current primary>` if it named none). Returns the new text and the
/// new key's id, one more than the largest.
pub fn add_key(text: &str) -> Result<(String, u32)> {
    let ring = Ring::parse(text)?;
    let id = ring
        .ciphers
        .keys()
        .max()
        .copied()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| Error::Keys("no key id is left after u32::MAX".into()))?;
    let key = XChaCha20Poly1305::generate_key(&mut OsRng);
    let mut out = without_entries(text, |e| matches!(e, Entry::Primary(_)));
    out.push_str(&format!(
        "{id}:{}\nprimary={}\n",
        hex::encode(key),
        ring.primary
    ));
    Ring::parse(&out)?;
    Ok((out, id))
}

/// Makes key `id`, which must be in the ring, the one that seals new messages.
pub fn set_primary(text: &str, id: u32) -> Result<String> {
    let ring = Ring::parse(text)?;
    if !ring.ciphers.contains_key(&id) {
        return Err(Error::Keys(format!("key {id} is not in the ring")));
    }
    let mut out = without_entries(text, |e| matches!(e, Entry::Primary(_)));
    out.push_str(&format!("primary={id}\n"));
    Ring::parse(&out)?;
    Ok(out)
}

/// Removes key `id` from the ring; the primary key cannot be removed. Rows still sealed
/// with it become unreadable: re-encrypt them first.
pub fn remove_key(text: &str, id: u32) -> Result<String> {
    let ring = Ring::parse(text)?;
    if !ring.ciphers.contains_key(&id) {
        return Err(Error::Keys(format!("key {id} is not in the ring")));
    }
    if ring.primary == id {
        return Err(Error::Keys(format!(
            "key {id} is the primary key: make another key primary first"
        )));
    }
    let out = without_entries(text, |e| matches!(e, Entry::Key { id: k, .. } if *k == id));
    Ring::parse(&out)?;
    Ok(out)
}

/// The text with the entries `drop` picks removed, comments and other entries kept; a
/// line left with nothing but separators goes, and the text ends with a newline.
fn without_entries(text: &str, drop: impl Fn(&Entry<'_>) -> bool) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let (code, comment) = match line.split_once('#') {
            Some((code, comment)) => (code, Some(comment)),
            None => (line, None),
        };
        let kept: Vec<&str> = code
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter(|e| parse_entry(0, e).map_or(true, |entry| !drop(&entry)))
            .collect();
        let had = code.split(',').any(|e| !e.trim().is_empty());
        if had && kept.is_empty() && comment.is_none() {
            continue;
        }
        out.push_str(&kept.join(","));
        if let Some(comment) = comment {
            if !kept.is_empty() {
                out.push(' ');
            }
            out.push('#');
            out.push_str(comment);
        }
        out.push('\n');
    }
    out
}

/// Replaces a key file with new text: written beside it with mode 0600, synced, then
/// renamed over it, so a process reloading it reads the old ring or the new one whole.
pub fn replace_key_file(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    write_private(&tmp, text)?;
    fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// `"chat-msg-v1" | id | len(conversation) | conversation | from`, length-prefixed so that
/// no two different triples produce the same bytes.
fn associated_data(id: Uuid, conversation: &str, from: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(11 + 16 + 4 + conversation.len() + from.len());
    aad.extend_from_slice(b"chat-msg-v1");
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(&(conversation.len() as u32).to_be_bytes());
    aad.extend_from_slice(conversation.as_bytes());
    aad.extend_from_slice(from.as_bytes());
    aad
}

/// Writes a new file that only its owner may read (0600 on Unix): keys and secrets.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_line(id: u32, byte: u8) -> String {
        format!("{id}:{}", hex::encode([byte; 32]))
    }

    fn ring() -> Keyring {
        Keyring::parse(&key_line(1, 7)).expect("valid ring")
    }

    #[test]
    fn round_trip() {
        let ring = ring();
        let id = Uuid::now_v7();
        let sealed = ring.seal(id, "dm:a:b", "a", b"hello").expect("seal");
        assert_ne!(&sealed[HEADER..], b"hello");
        assert_eq!(
            ring.open(id, "dm:a:b", "a", &sealed).expect("open"),
            b"hello"
        );
    }

    #[test]
    fn nonces_are_random_per_message() {
        let ring = ring();
        let id = Uuid::now_v7();
        let a = ring.seal(id, "dm:a:b", "a", b"same").expect("seal");
        let b = ring.seal(id, "dm:a:b", "a", b"same").expect("seal");
        assert_ne!(a[5..HEADER], b[5..HEADER]);
    }

    #[test]
    fn tampering_with_ciphertext_nonce_or_associated_data_fails() {
        let ring = ring();
        let id = Uuid::now_v7();
        let sealed = ring.seal(id, "dm:a:b", "a", b"hello").expect("seal");

        let mut flipped_ct = sealed.clone();
        let last = flipped_ct.len() - 1;
        flipped_ct[last] ^= 1;
        assert!(matches!(
            ring.open(id, "dm:a:b", "a", &flipped_ct),
            Err(Error::Decrypt(_))
        ));

        let mut flipped_nonce = sealed.clone();
        flipped_nonce[10] ^= 1;
        assert!(matches!(
            ring.open(id, "dm:a:b", "a", &flipped_nonce),
            Err(Error::Decrypt(_))
        ));

        assert!(matches!(
            ring.open(id, "dm:a:c", "a", &sealed),
            Err(Error::Decrypt(_))
        ));
        assert!(matches!(
            ring.open(id, "dm:a:b", "b", &sealed),
            Err(Error::Decrypt(_))
        ));
        assert!(matches!(
            ring.open(id, "dm:a:b", "a", &sealed[..HEADER - 1]),
            Err(Error::Decrypt(_))
        ));
    }

    #[test]
    fn a_body_moved_to_another_message_fails() {
        let ring = ring();
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let sealed = ring
            .seal(first, "dm:a:b", "a", b"for the first")
            .expect("seal");
        assert!(matches!(
            ring.open(second, "dm:a:b", "a", &sealed),
            Err(Error::Decrypt(_))
        ));
    }

    #[test]
    fn an_unknown_key_id_is_an_error() {
        let old = Keyring::parse(&key_line(1, 1)).expect("ring");
        let new = Keyring::parse(&key_line(2, 2)).expect("ring");
        let id = Uuid::now_v7();
        let sealed = new.seal(id, "dm:a:b", "a", b"x").expect("seal");
        assert!(matches!(
            old.open(id, "dm:a:b", "a", &sealed),
            Err(Error::UnknownKey(_, 2))
        ));
    }

    #[test]
    fn after_adding_a_primary_key_old_rows_still_decrypt() {
        let before = Keyring::parse(&key_line(1, 1)).expect("ring");
        let id = Uuid::now_v7();
        let old_row = before.seal(id, "dm:a:b", "a", b"old").expect("seal");

        let after =
            Keyring::parse(&format!("{}\n{}", key_line(1, 1), key_line(2, 2))).expect("ring");
        assert_eq!(after.primary(), 2);
        assert_eq!(
            after.open(id, "dm:a:b", "a", &old_row).expect("open"),
            b"old"
        );
        let new_row = after.seal(id, "dm:a:b", "a", b"new").expect("seal");
        assert_eq!(
            u32::from_be_bytes([new_row[1], new_row[2], new_row[3], new_row[4]]),
            2
        );
    }

    #[test]
    fn bad_key_rings_are_refused_with_a_reason() {
        for (text, needle) in [
            ("", "empty"),
            ("1:abcd", "32"),
            ("x:00", "not a number"),
            ("1:zz", "hexadecimal"),
            ("nocolon", "expected"),
        ] {
            let err = Keyring::parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?} gave {err}");
        }
        let dup = format!("{}\n{}", key_line(1, 1), key_line(1, 2));
        assert!(Keyring::parse(&dup).is_err());
    }

    #[test]
    fn a_named_primary_wins_over_the_last_entry() {
        let text = format!("{}\n{}\nprimary=1", key_line(1, 1), key_line(2, 2));
        assert_eq!(Keyring::parse(&text).expect("ring").primary(), 1);
        let missing = format!("{}\nprimary=3", key_line(1, 1));
        let err = Keyring::parse(&missing)
            .expect_err("primary not in ring")
            .to_string();
        assert!(err.contains("primary=3"), "{err}");
    }

    #[test]
    fn rotation_edits_keep_comments_and_refuse_what_would_lose_rows() {
        let text = format!("# production ring\n{} # since 2026\n", key_line(1, 1));
        let (added, id) = add_key(&text).expect("add");
        assert_eq!(id, 2);
        let ring = Keyring::parse(&added).expect("ring");
        assert_eq!((ring.primary(), ring.key_ids()), (1, vec![1, 2]));
        assert!(added.starts_with("# production ring\n"), "{added}");
        assert!(added.contains("# since 2026"), "{added}");

        let promoted = set_primary(&added, 2).expect("promote");
        assert_eq!(Keyring::parse(&promoted).expect("ring").primary(), 2);
        assert_eq!(promoted.matches("primary=").count(), 1, "{promoted}");
        assert!(set_primary(&promoted, 9).is_err());

        let err = remove_key(&promoted, 2).expect_err("primary").to_string();
        assert!(err.contains("primary"), "{err}");
        let retired = remove_key(&promoted, 1).expect("retire");
        let ring = Keyring::parse(&retired).expect("ring");
        assert_eq!((ring.primary(), ring.key_ids()), (2, vec![2]));
        assert!(!retired.contains(&key_line(1, 1)), "{retired}");
        assert!(remove_key(&retired, 1).is_err());
    }

    #[test]
    fn a_reload_changes_every_clone_and_a_bad_file_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        write_private(&path, &key_line(1, 1)).expect("write");
        let ring = Keyring::load(&KeySource::File(path.clone()), dir.path()).expect("load");
        let clone = ring.clone();
        let id = Uuid::now_v7();
        let old = ring.seal(id, "dm:a:b", "a", b"old").expect("seal");

        replace_key_file(&path, &format!("{}\n{}", key_line(1, 1), key_line(2, 2))).expect("edit");
        assert!(ring.reload().expect("reload"));
        assert_eq!(clone.primary(), 2);
        let resealed = clone
            .reseal(id, "dm:a:b", "a", &old)
            .expect("reseal")
            .expect("sealed with key 1");
        assert_eq!(Keyring::sealed_with(&resealed), Some(2));
        assert!(clone
            .reseal(id, "dm:a:b", "a", &resealed)
            .expect("reseal")
            .is_none());

        replace_key_file(&path, "2:nothex").expect("edit");
        assert!(ring.reload().is_err());
        assert_eq!(clone.primary(), 2);
        assert_eq!(clone.open(id, "dm:a:b", "a", &old).expect("open"), b"old");
    }

    #[test]
    fn dev_keys_are_generated_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Keyring::load(&KeySource::DevGenerated, dir.path()).expect("generate");
        let b = Keyring::load(&KeySource::DevGenerated, dir.path()).expect("reload");
        let id = Uuid::now_v7();
        let sealed = a.seal(id, "dm:a:b", "a", b"x").expect("seal");
        assert_eq!(b.open(id, "dm:a:b", "a", &sealed).expect("open"), b"x");
    }
}
