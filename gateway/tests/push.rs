//! Guarantee 7: a message for a user with no device online waits in their pending queue
//! and emits a push-notification event (a log line and a metric in the embedded mode).
//! Alone in its own test binary so that the process-wide metric counts only this test.

mod common;

use common::start;

#[tokio::test]
async fn offline_recipients_get_a_push_event_and_online_ones_do_not() {
    let gw = start(|_| {}).await;
    let mut alice = gw.connect("alice").await;
    let before = gw.metric("dispatcher_push_events_total").await;
    let sent = alice.send_message("bob", "are you there?", "c-1").await;
    assert_eq!(
        gw.metric_reaches("dispatcher_push_events_total", before + 1.0)
            .await,
        before + 1.0
    );

    let mut bob = gw.connect("bob").await;
    assert_eq!(
        bob.recv_type("message").await["message_id"],
        sent["message_id"],
        "it waited"
    );
    alice.send_message("bob", "now you are", "c-2").await;
    bob.recv_type("message").await;
    assert_eq!(
        gw.metric("dispatcher_push_events_total").await,
        before + 1.0,
        "no push for online users"
    );
}
