//! Kubernetes' remote command protocol over WebSocket (`v4.channel.k8s.io` and
//! `v5.channel.k8s.io`): every binary message starts with its channel's number, 0 stdin,
//! 1 stdout, 2 stderr, 3 the error channel (one `Status` when the command has ended),
//! 4 terminal resizes; v5 adds 255, by which a side says that it closes one of its channels
//! (kubectl closes stdin so).

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;

/// The protocols served, the preferred first: v5 can close stdin, which a piped `kubectl
/// exec -i` needs to end a command reading to the end of its input.
pub const PROTOCOL_V5: &str = "v5.channel.k8s.io";
pub const PROTOCOL_V4: &str = "v4.channel.k8s.io";

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: the message's one payload byte is the channel being closed.
pub const CLOSE: u8 = 255;

/// The protocol to speak, from a `Sec-WebSocket-Protocol` header's list: v5 if offered, else
/// v4.
pub fn choose_protocol(offered: &str) -> Option<&'static str> {
    let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
    [PROTOCOL_V5, PROTOCOL_V4].into_iter().find(|protocol| offered.contains(protocol))
}

/// A message's payload: the channel byte, then the data.
pub fn channel_message(channel: u8, data: &[u8]) -> Bytes {
    let mut message = BytesMut::with_capacity(1 + data.len());
    message.put_u8(channel);
    message.put_slice(data);
    message.freeze()
}

/// What a client sent, by channel.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    Stdin(&'a [u8]),
    /// v5: the client will send nothing more on this channel.
    Close(u8),
    /// A terminal's new size (JSON), with a TTY.
    Resize(&'a [u8]),
    /// Anything else: ignored.
    Other(u8),
}

/// Splits a binary message from the client; `None` for an empty one (no channel byte).
pub fn parse_client_message(payload: &[u8]) -> Option<ClientMessage<'_>> {
    let (&channel, data) = payload.split_first()?;
    Some(match channel {
        STDIN => ClientMessage::Stdin(data),
        CLOSE => ClientMessage::Close(*data.first()?),
        RESIZE => ClientMessage::Resize(data),
        other => ClientMessage::Other(other),
    })
}

/// How the command ended, as the error channel reports it.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status (128 + the signal for a command killed by one, as shells report it).
    Exited(i32),
    /// It could not be run at all.
    Failed(String),
}

/// The `Status` of the error channel: `Success`, or kubelet's `NonZeroExitCode` with the code
/// as the `ExitCode` cause (which kubectl exits with), or a failure with its message.
pub fn status_json(outcome: &Outcome) -> Vec<u8> {
    let status = match outcome {
        Outcome::Exited(0) => json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(message) => json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500,
        }),
    };
    status.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v5_is_chosen_when_offered_and_v4_otherwise() {
        assert_eq!(choose_protocol("v5.channel.k8s.io, v4.channel.k8s.io"), Some(PROTOCOL_V5));
        assert_eq!(choose_protocol("v4.channel.k8s.io,channel.k8s.io"), Some(PROTOCOL_V4));
        assert_eq!(choose_protocol("base64.channel.k8s.io"), None);
        assert_eq!(choose_protocol(""), None);
    }

    #[test]
    fn client_messages_are_split_by_their_channel_byte() {
        assert_eq!(parse_client_message(b"\x00hello"), Some(ClientMessage::Stdin(b"hello")));
        assert_eq!(parse_client_message(b"\x00"), Some(ClientMessage::Stdin(b"")));
        assert_eq!(parse_client_message(&[CLOSE, STDIN]), Some(ClientMessage::Close(STDIN)));
        assert_eq!(parse_client_message(&[CLOSE]), None, "a close names its channel");
        assert_eq!(parse_client_message(b"\x04{}"), Some(ClientMessage::Resize(b"{}")));
        assert_eq!(parse_client_message(b"\x07x"), Some(ClientMessage::Other(7)));
        assert_eq!(parse_client_message(b""), None);
        assert_eq!(&channel_message(STDERR, b"oops")[..], b"\x02oops");
    }

    #[test]
    fn a_non_zero_exit_is_reported_with_its_code_as_the_exit_code_cause() {
        let status: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Exited(3))).unwrap();
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0], json!({"reason": "ExitCode", "message": "3"}));
        let success: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Exited(0))).unwrap();
        assert_eq!(success["status"], "Success");
        assert!(success.get("details").is_none());
        let failed: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Failed("no sh".into()))).unwrap();
        assert_eq!(
            (failed["status"].as_str(), failed["message"].as_str()),
            (Some("Failure"), Some("no sh"))
        );
    }
}
