//! Fuzz targets for what reaches the server from outside: client frames (any text a
//! WebSocket client sends), tokens (any string in the handshake), and the inbound log's
//! envelopes (any record in the Kafka topic). Each test is one target (one `check!`, as
//! libFuzzer runs one per process). Under `cargo test` each runs a bounded number of random
//! inputs ([`ITERATIONS`], or `BOLERO_RANDOM_ITERATIONS`): raw bytes, or edits of valid
//! seeds so that the parsers get past their first byte. docs/security.md has the commands
//! for longer runs and their last results.

use bolero::check;
use dispatcher::Envelope;
use gateway::auth::Auth;
use gateway::protocol::ClientFrame;
use serde_json::Value;
use storage::{Conversation, Message};
use uuid::Uuid;

/// Random inputs per target in the test command.
const ITERATIONS: usize = 100_000;

/// Edits of a seed: at `at` (modulo its length), `op` 0 replaces the byte with `byte`,
/// 1 inserts `byte`, 2 removes the byte, 3 duplicates the rest of the input from there.
type Edits = Vec<(u16, u8, u8)>;

fn edit(seed: &[u8], edits: &Edits) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(at, op, byte) in edits {
        let at = usize::from(at) % (out.len() + 1);
        match op % 4 {
            0 if at < out.len() => out[at] = byte,
            1 => out.insert(at, byte),
            2 if at < out.len() => {
                out.remove(at);
            }
            3 if out.len() < 4096 => {
                let rest = out[at..].to_vec();
                out.extend_from_slice(&rest);
            }
            _ => {}
        }
    }
    out
}

const FRAMES: &[&str] = &[
    r#"{"type":"send","to":"bob","body":"hi","client_msg_id":"c-1"}"#,
    r#"{"type":"send","conversation":"g:0190b9a8-7d2e-7000-8000-000000000001","body":"hi","client_msg_id":"c-2","attachments":[{"media_id":"0190b9a8-7d2e-7000-8000-000000000002","caption":"x"}]}"#,
    r#"{"type":"send","to":"bob","client_msg_id":"c-3","e2ee":{"device":"phone","ciphertexts":[{"user":"bob","device":"laptop","type":0,"body":"AAAA"}]}}"#,
    r#"{"type":"ack","message_ids":["0190b9a8-7d2e-7000-8000-000000000003"],"receipt_ids":[],"notice_ids":[]}"#,
    r#"{"type":"read","conversation":"dm:alice:bob","message_id":"0190b9a8-7d2e-7000-8000-000000000004"}"#,
    r#"{"type":"typing","conversation":"dm:alice:bob"}"#,
    r#"{"type":"history","ref":7,"conversation":"dm:alice:bob","before":"0190b9a8-7d2e-7000-8000-000000000005","limit":50}"#,
    r#"{"type":"conversations","ref":"r-1","limit":20}"#,
    r#"{"type":"group_info","ref":"r-2","conversation":"g:0190b9a8-7d2e-7000-8000-000000000006"}"#,
    r#"{"type":"subscribe_presence","users":["bob","carol"]}"#,
    r#"{"type":"create_group","ref":"r-3","name":"team","members":["bob","carol"]}"#,
    r#"{"type":"add_members","ref":"r-4","conversation":"g:0190b9a8-7d2e-7000-8000-000000000007","members":["dave"]}"#,
    r#"{"type":"ping","ref":"r-5"}"#,
    // Refusals that must still carry the frame's `client_msg_id` (a `ref` that is not one).
    r#"{"type":"send","ref":[1],"to":"bob","body":"hi","client_msg_id":"c-4"}"#,
    r#"{"type":"send","ref":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","client_msg_id":"c-5"}"#,
    r#"{"type":"keys_upload","ref":"r-6","device":"phone","identity_key":"AAAA","one_time_keys":["BBBB"]}"#,
];

/// The contract the parser keeps for any text: it never panics, and a refusal carries the
/// frame's `ref` (when it is a valid one) and `client_msg_id`, so the client can match it.
fn check_frame(text: &str) {
    let Err(refusal) = ClientFrame::parse(text) else {
        return;
    };
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let valid_ref = |r: &&Value| match r {
        Value::String(s) => s.chars().count() <= 128,
        Value::Number(_) => true,
        _ => false,
    };
    if let Some(reference) = object.get("ref").filter(valid_ref) {
        assert_eq!(refusal.reference.as_ref(), Some(reference), "{text}");
    }
    if let Some(Value::String(id)) = object.get("client_msg_id") {
        assert_eq!(
            refusal.client_msg_id.as_deref(),
            Some(id.as_str()),
            "{text}"
        );
    }
}

#[test]
fn edited_client_frames_are_parsed_or_refused_with_their_ref() {
    check!()
        .with_type::<(u8, Edits)>()
        .with_iterations(ITERATIONS)
        .for_each(|(seed, edits)| {
            let bytes = edit(FRAMES[usize::from(*seed) % FRAMES.len()].as_bytes(), edits);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                check_frame(text);
            }
        });
}

#[test]
fn any_client_frame_is_parsed_or_refused_with_its_ref() {
    check!()
        .with_iterations(ITERATIONS)
        .for_each(|bytes: &[u8]| {
            if let Ok(text) = std::str::from_utf8(bytes) {
                check_frame(text);
            }
        });
}

const SECRET: &[u8] = b"fuzzing secret, 32 bytes or more";

fn auth() -> std::panic::AssertUnwindSafe<Auth> {
    // Unwind-safe: the checks only read it (it holds the JWKS client's shared handles).
    std::panic::AssertUnwindSafe(Auth::new(SECRET))
}

/// An edited token is refused, or (an edit that changes nothing the signature covers)
/// names the same user.
#[test]
fn edited_tokens_are_refused() {
    let auth = auth();
    let good = auth.mint("alice", std::time::Duration::from_secs(3600));
    assert_eq!(auth.verify(&good).ok().as_deref(), Some("alice"));
    check!()
        .with_type::<Edits>()
        .with_iterations(ITERATIONS)
        .for_each(|edits| {
            let bytes = edit(good.as_bytes(), edits);
            if let Ok(token) = std::str::from_utf8(&bytes) {
                if let Ok(user) = auth.verify(token) {
                    assert_eq!(user, "alice", "{token}");
                }
            }
        });
}

#[test]
fn any_other_string_is_refused_as_a_token() {
    let auth = auth();
    check!()
        .with_iterations(ITERATIONS)
        .for_each(|bytes: &[u8]| {
            if let Ok(token) = std::str::from_utf8(bytes) {
                assert!(auth.verify(token).is_err(), "{token}");
            }
        });
}

/// A token signed with the key is accepted exactly when its `sub` is a valid user id.
#[test]
fn a_signed_token_is_accepted_only_for_a_valid_user_id() {
    let auth = auth();
    check!()
        .with_type::<String>()
        .with_iterations(ITERATIONS / 10)
        .for_each(|sub| {
            let token = auth.mint(sub, std::time::Duration::from_secs(3600));
            assert_eq!(
                auth.verify(&token).is_ok(),
                storage::is_valid_id(sub),
                "{sub:?}"
            );
        });
}

fn envelopes() -> Vec<Vec<u8>> {
    let id = Uuid::now_v7();
    let message = |conversation, body: &str| Envelope::Message {
        message: Box::new(Message {
            id,
            conversation,
            from: "alice".into(),
            body: body.into(),
            ts: 1_700_000_000_000,
            e2ee: None,
            attachments: Vec::new(),
        }),
        origin: Some(presence::ConnRef {
            node: "gw-1".into(),
            conn: 7,
        }),
        client_msg_id: Some("c-1".into()),
    };
    [
        message(Conversation::direct("alice", "bob"), "hello"),
        message(Conversation::Group(id), ""),
        Envelope::Ack {
            user: "bob".into(),
            message_ids: vec![id, Uuid::now_v7()],
            device: Some("phone".into()),
        },
        Envelope::Read {
            user: "bob".into(),
            conversation: Conversation::direct("alice", "bob"),
            message_id: id,
        },
    ]
    .iter()
    .map(|e| serde_json::to_vec(e).expect("an envelope encodes"))
    .collect()
}

/// Any record in the topic is refused or decodes to an envelope that encodes and decodes
/// to itself (what a dispatcher reads is what a gateway could have written).
fn check_envelope(bytes: &[u8]) {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(bytes) else {
        return;
    };
    let again = serde_json::to_vec(&envelope).expect("a decoded envelope encodes");
    let decoded: Envelope = serde_json::from_slice(&again).expect("and decodes again");
    assert_eq!(decoded, envelope, "{}", String::from_utf8_lossy(bytes));
}

#[test]
fn edited_log_records_decode_to_envelopes_that_round_trip_or_are_refused() {
    let seeds = envelopes();
    check!()
        .with_type::<(u8, Edits)>()
        .with_iterations(ITERATIONS)
        .for_each(|(seed, edits)| {
            check_envelope(&edit(&seeds[usize::from(*seed) % seeds.len()], edits));
        });
}

#[test]
fn any_log_record_decodes_to_an_envelope_that_round_trips_or_is_refused() {
    check!()
        .with_iterations(ITERATIONS)
        .for_each(|bytes: &[u8]| check_envelope(bytes));
}
