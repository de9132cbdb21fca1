//! Mutual authentication of two nodes that share a secret: an HMAC-SHA256
//! challenge–response, as two state machines that do no IO.
//!
//! ```text
//! acceptor                                   connector
//!    | -- Challenge { acceptor_nonce } ---------> |
//!    | <-- Response { connector_nonce, connector, |
//!    |      mac = HMAC(k, "sinter-auth-v1 connector" ‖ An ‖ Cn ‖ connector) }
//!    |  verify (constant time)                    |
//!    | -- Confirm { acceptor,                  -> |
//!    |      mac = HMAC(k, "sinter-auth-v1 acceptor" ‖ Cn ‖ An ‖ acceptor ‖ connector) }
//!    |                                            |  verify (constant time)
//! ```
//!
//! Each side proves it knows the secret by a MAC over a nonce the other side
//! chose for this connection, so a recorded handshake replayed on a new
//! connection fails: the caller supplies a fresh random nonce per connection
//! (this crate has no RNG). The two directions use different labels, so one
//! side's proof can never be reflected back as the other's.
//!
//! What this does not do: it authenticates the start of a connection, not each
//! later frame, and it encrypts nothing. Across untrusted networks use TLS.

use std::ffi::OsString;
use std::io::Read;
use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::decoder::{Frame, FrameDecoder};
use crate::error::WireError;
use crate::header::{AUTH_PAYLOAD_BYTES_MAX, FrameHeader, HEADER_BYTES, MessageType};

type HmacSha256 = Hmac<Sha256>;

/// Bytes in a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes in an HMAC-SHA256 tag.
pub const MAC_BYTES: usize = 32;
/// The shortest secret accepted.
pub const SECRET_BYTES_MIN: usize = 16;
/// The largest secret file read.
pub const SECRET_FILE_BYTES_MAX: usize = 4096;

/// A per-connection random value, supplied by the caller.
pub type Nonce = [u8; NONCE_BYTES];

const CONNECTOR_LABEL: &[u8] = b"sinter-auth-v1 connector";
const ACCEPTOR_LABEL: &[u8] = b"sinter-auth-v1 acceptor";

/// The shared secret. Its `Debug` output does not show the bytes.
#[derive(Clone)]
pub struct Secret {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes, redacted>)", self.bytes.len())
    }
}

impl Secret {
    /// A secret from raw bytes, at least [`SECRET_BYTES_MIN`] of them.
    pub fn new(bytes: Vec<u8>) -> Result<Secret, WireError> {
        Secret::checked("given bytes".to_string(), bytes)
    }

    /// Reads the secret from a file, ignoring leading and trailing ASCII
    /// whitespace (so `openssl rand -hex 32 > file` works). Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Secret, WireError> {
        let path = path.as_ref();
        let file_error = |source| WireError::SecretFile {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(file_error)?;
        let mut bytes = Vec::new();
        file.take(SECRET_FILE_BYTES_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(file_error)?;
        if bytes.len() > SECRET_FILE_BYTES_MAX {
            return Err(WireError::SecretFileTooLarge {
                path: path.to_path_buf(),
                max: SECRET_FILE_BYTES_MAX,
            });
        }
        Secret::checked(format!("file {}", path.display()), trim_ascii_whitespace(bytes))
    }

    /// Reads the secret from environment variable `var`, ignoring leading and
    /// trailing ASCII whitespace. Errors name the variable.
    pub fn from_env(var: &str) -> Result<Secret, WireError> {
        Secret::from_env_value(var, std::env::var_os(var))
    }

    fn from_env_value(var: &str, value: Option<OsString>) -> Result<Secret, WireError> {
        let value = value.ok_or_else(|| WireError::SecretEnvMissing { var: var.to_string() })?;
        Secret::checked(
            format!("environment variable {var}"),
            trim_ascii_whitespace(value.into_encoded_bytes()),
        )
    }

    fn checked(origin: String, bytes: Vec<u8>) -> Result<Secret, WireError> {
        if bytes.len() < SECRET_BYTES_MIN {
            return Err(WireError::SecretTooShort {
                origin,
                bytes: bytes.len(),
                min: SECRET_BYTES_MIN,
            });
        }
        Ok(Secret { bytes })
    }

    fn keyed_mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.bytes).expect("HMAC takes keys of any length")
    }
}

fn trim_ascii_whitespace(bytes: Vec<u8>) -> Vec<u8> {
    bytes.trim_ascii().to_vec()
}

/// The role a process plays in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Coordinator,
    Server,
    Worker,
    Launcher,
    /// A federation's server (`sinter fl server`).
    FlServer,
    /// A federation's client (`sinter fl client`).
    FlClient,
}

impl Role {
    /// The byte that stands for the role inside a MAC.
    fn code(self) -> u8 {
        match self {
            Role::Coordinator => 1,
            Role::Server => 2,
            Role::Worker => 3,
            Role::Launcher => 4,
            Role::FlServer => 5,
            Role::FlClient => 6,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Role::Coordinator => "coordinator",
            Role::Server => "server",
            Role::Worker => "worker",
            Role::Launcher => "launcher",
            Role::FlServer => "fl server",
            Role::FlClient => "fl client",
        };
        f.write_str(name)
    }
}

/// Who a node is: its role and its rank within that role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerInfo {
    pub role: Role,
    pub rank: u32,
}

impl PeerInfo {
    fn mac_bytes(self) -> [u8; 5] {
        let rank = self.rank.to_le_bytes();
        [self.role.code(), rank[0], rank[1], rank[2], rank[3]]
    }
}

impl std::fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rank {}", self.role, self.rank)
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("the peer's proof does not verify (different secret, or a replayed handshake)")]
    BadMac,
    #[error("expected {expected}, got {got}")]
    UnexpectedMessage { expected: &'static str, got: &'static str },
    #[error("malformed handshake message: {why}")]
    Malformed { why: String },
    #[error("frame sender rank {header_rank} differs from the claimed rank {claimed_rank}")]
    SenderMismatch { header_rank: u32, claimed_rank: u32 },
    #[error("the peer sent back this side's own nonce")]
    NonceReflected,
    #[error("the handshake has already finished or failed")]
    Finished,
}

/// What a handshake step asks the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Write these bytes (one frame) and wait for the peer's next frame.
    Send(Vec<u8>),
    /// The peer is authenticated. Write `send` first if present; then the
    /// connection carries ordinary traffic.
    Authenticated { peer: PeerInfo, send: Option<Vec<u8>> },
}

#[derive(Debug, Serialize, Deserialize)]
enum AuthMessage {
    Challenge {
        acceptor_nonce: Nonce,
    },
    Response {
        connector_nonce: Nonce,
        connector: PeerInfo,
        mac: [u8; MAC_BYTES],
    },
    Confirm {
        acceptor: PeerInfo,
        mac: [u8; MAC_BYTES],
    },
}

impl AuthMessage {
    fn name(&self) -> &'static str {
        match self {
            AuthMessage::Challenge { .. } => "challenge",
            AuthMessage::Response { .. } => "response",
            AuthMessage::Confirm { .. } => "confirm",
        }
    }

    fn encode(&self, sender: u32) -> Vec<u8> {
        let mut frame = postcard::to_extend(self, vec![0u8; HEADER_BYTES]).expect("auth messages always encode");
        let header = FrameHeader::new(MessageType::Auth, 0, sender, &frame[HEADER_BYTES..])
            .expect("auth messages fit their limit");
        frame[..HEADER_BYTES].copy_from_slice(&header.encode());
        frame
    }

    /// Parses an auth frame; `expected` names the message the caller waits for.
    fn decode(frame: &Frame, expected: &'static str) -> Result<AuthMessage, AuthFailure> {
        if frame.header.kind != MessageType::Auth {
            let got = match frame.header.kind {
                MessageType::Control => "a control frame",
                MessageType::Tensor => "a tensor frame",
                MessageType::Auth => "an auth frame",
                MessageType::Ps => "a parameter-server frame",
            };
            return Err(AuthFailure::UnexpectedMessage { expected, got });
        }
        match postcard::take_from_bytes::<AuthMessage>(&frame.payload) {
            Ok((message, [])) => Ok(message),
            Ok((_, rest)) => Err(AuthFailure::Malformed {
                why: format!("{} trailing bytes", rest.len()),
            }),
            Err(error) => Err(AuthFailure::Malformed { why: error.to_string() }),
        }
    }
}

fn connector_mac(key: &HmacSha256, acceptor_nonce: &Nonce, connector_nonce: &Nonce, connector: PeerInfo) -> HmacSha256 {
    let mut mac = key.clone();
    mac.update(CONNECTOR_LABEL);
    mac.update(acceptor_nonce);
    mac.update(connector_nonce);
    mac.update(&connector.mac_bytes());
    mac
}

fn acceptor_mac(
    key: &HmacSha256,
    acceptor_nonce: &Nonce,
    connector_nonce: &Nonce,
    acceptor: PeerInfo,
    connector: PeerInfo,
) -> HmacSha256 {
    let mut mac = key.clone();
    mac.update(ACCEPTOR_LABEL);
    mac.update(connector_nonce);
    mac.update(acceptor_nonce);
    mac.update(&acceptor.mac_bytes());
    mac.update(&connector.mac_bytes());
    mac
}

fn failed(peer: Option<PeerInfo>, reason: AuthFailure) -> WireError {
    WireError::AuthFailed { peer, reason }
}

fn check_sender(header: &FrameHeader, claimed: PeerInfo) -> Result<(), WireError> {
    if header.sender != claimed.rank {
        let reason = AuthFailure::SenderMismatch {
            header_rank: header.sender,
            claimed_rank: claimed.rank,
        };
        return Err(failed(Some(claimed), reason));
    }
    Ok(())
}

#[derive(Debug)]
enum AcceptorState {
    AwaitingResponse,
    Done,
}

/// The side that accepted the connection: it sends the challenge.
#[derive(Debug)]
pub struct Acceptor {
    key: HmacSha256,
    own: PeerInfo,
    nonce: Nonce,
    state: AcceptorState,
    decoder: FrameDecoder,
}

impl Acceptor {
    /// A handshake for one accepted connection, with a fresh random `nonce`,
    /// and the challenge frame to write first.
    pub fn new(secret: &Secret, own: PeerInfo, nonce: Nonce) -> (Acceptor, Vec<u8>) {
        let challenge = AuthMessage::Challenge { acceptor_nonce: nonce }.encode(own.rank);
        let acceptor = Acceptor {
            key: secret.keyed_mac(),
            own,
            nonce,
            state: AcceptorState::AwaitingResponse,
            decoder: FrameDecoder::with_payload_bytes_max(AUTH_PAYLOAD_BYTES_MAX),
        };
        (acceptor, challenge)
    }

    /// Feeds received bytes. Takes only the bytes of handshake frames, so
    /// whatever is left in `input` after `Authenticated` is ordinary traffic.
    /// `Ok(None)` means more bytes are needed.
    pub fn on_bytes(&mut self, input: &mut &[u8]) -> Result<Option<AuthStep>, WireError> {
        if matches!(self.state, AcceptorState::Done) {
            return Err(failed(None, AuthFailure::Finished));
        }
        match self.decoder.decode(input) {
            Ok(Some(frame)) => self.on_frame(&frame).map(Some),
            Ok(None) => Ok(None),
            Err(error) => {
                self.state = AcceptorState::Done;
                Err(error)
            }
        }
    }

    /// Feeds one received frame (for callers with their own decoder).
    pub fn on_frame(&mut self, frame: &Frame) -> Result<AuthStep, WireError> {
        let state = std::mem::replace(&mut self.state, AcceptorState::Done);
        let AcceptorState::AwaitingResponse = state else {
            return Err(failed(None, AuthFailure::Finished));
        };
        let message = AuthMessage::decode(frame, "response").map_err(|reason| failed(None, reason))?;
        let AuthMessage::Response {
            connector_nonce,
            connector,
            mac,
        } = message
        else {
            let reason = AuthFailure::UnexpectedMessage {
                expected: "response",
                got: message.name(),
            };
            return Err(failed(None, reason));
        };
        check_sender(&frame.header, connector)?;
        if connector_nonce == self.nonce {
            return Err(failed(Some(connector), AuthFailure::NonceReflected));
        }
        connector_mac(&self.key, &self.nonce, &connector_nonce, connector)
            .verify_slice(&mac)
            .map_err(|_| failed(Some(connector), AuthFailure::BadMac))?;
        let proof = acceptor_mac(&self.key, &self.nonce, &connector_nonce, self.own, connector);
        let confirm = AuthMessage::Confirm {
            acceptor: self.own,
            mac: proof.finalize().into_bytes().into(),
        };
        Ok(AuthStep::Authenticated {
            peer: connector,
            send: Some(confirm.encode(self.own.rank)),
        })
    }
}

#[derive(Debug)]
enum ConnectorState {
    AwaitingChallenge,
    AwaitingConfirm { acceptor_nonce: Nonce },
    Done,
}

/// The side that opened the connection: it answers the challenge.
#[derive(Debug)]
pub struct Connector {
    key: HmacSha256,
    own: PeerInfo,
    nonce: Nonce,
    state: ConnectorState,
    decoder: FrameDecoder,
}

impl Connector {
    /// A handshake for one new connection, with a fresh random `nonce`.
    /// The connector writes nothing until the challenge arrives.
    pub fn new(secret: &Secret, own: PeerInfo, nonce: Nonce) -> Connector {
        Connector {
            key: secret.keyed_mac(),
            own,
            nonce,
            state: ConnectorState::AwaitingChallenge,
            decoder: FrameDecoder::with_payload_bytes_max(AUTH_PAYLOAD_BYTES_MAX),
        }
    }

    /// Feeds received bytes; see [`Acceptor::on_bytes`].
    pub fn on_bytes(&mut self, input: &mut &[u8]) -> Result<Option<AuthStep>, WireError> {
        if matches!(self.state, ConnectorState::Done) {
            return Err(failed(None, AuthFailure::Finished));
        }
        match self.decoder.decode(input) {
            Ok(Some(frame)) => self.on_frame(&frame).map(Some),
            Ok(None) => Ok(None),
            Err(error) => {
                self.state = ConnectorState::Done;
                Err(error)
            }
        }
    }

    /// Feeds one received frame (for callers with their own decoder).
    pub fn on_frame(&mut self, frame: &Frame) -> Result<AuthStep, WireError> {
        match std::mem::replace(&mut self.state, ConnectorState::Done) {
            ConnectorState::AwaitingChallenge => {
                let message = AuthMessage::decode(frame, "challenge").map_err(|reason| failed(None, reason))?;
                let AuthMessage::Challenge { acceptor_nonce } = message else {
                    let reason = AuthFailure::UnexpectedMessage {
                        expected: "challenge",
                        got: message.name(),
                    };
                    return Err(failed(None, reason));
                };
                if acceptor_nonce == self.nonce {
                    return Err(failed(None, AuthFailure::NonceReflected));
                }
                let proof = connector_mac(&self.key, &acceptor_nonce, &self.nonce, self.own);
                let response = AuthMessage::Response {
                    connector_nonce: self.nonce,
                    connector: self.own,
                    mac: proof.finalize().into_bytes().into(),
                };
                self.state = ConnectorState::AwaitingConfirm { acceptor_nonce };
                Ok(AuthStep::Send(response.encode(self.own.rank)))
            }
            ConnectorState::AwaitingConfirm { acceptor_nonce } => {
                let message = AuthMessage::decode(frame, "confirm").map_err(|reason| failed(None, reason))?;
                let AuthMessage::Confirm { acceptor, mac } = message else {
                    let reason = AuthFailure::UnexpectedMessage {
                        expected: "confirm",
                        got: message.name(),
                    };
                    return Err(failed(None, reason));
                };
                check_sender(&frame.header, acceptor)?;
                acceptor_mac(&self.key, &acceptor_nonce, &self.nonce, acceptor, self.own)
                    .verify_slice(&mac)
                    .map_err(|_| failed(Some(acceptor), AuthFailure::BadMac))?;
                Ok(AuthStep::Authenticated {
                    peer: acceptor,
                    send: None,
                })
            }
            ConnectorState::Done => Err(failed(None, AuthFailure::Finished)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::encode_control;

    const WORKER_2: PeerInfo = PeerInfo {
        role: Role::Worker,
        rank: 2,
    };
    const SERVER_0: PeerInfo = PeerInfo {
        role: Role::Server,
        rank: 0,
    };

    fn secret(fill: u8) -> Secret {
        Secret::new(vec![fill; 32]).unwrap()
    }

    fn frame(bytes: &[u8]) -> Frame {
        let mut decoder = FrameDecoder::new();
        let frame = decoder.decode(&mut &bytes[..]).unwrap().unwrap();
        decoder.finish().unwrap();
        frame
    }

    fn send(step: AuthStep) -> Vec<u8> {
        match step {
            AuthStep::Send(bytes) => bytes,
            other => panic!("expected Send, got {other:?}"),
        }
    }

    fn auth_failure(result: Result<AuthStep, WireError>) -> (Option<PeerInfo>, AuthFailure) {
        match result {
            Err(WireError::AuthFailed { peer, reason }) => (peer, reason),
            other => panic!("expected AuthFailed, got {other:?}"),
        }
    }

    /// Runs a handshake between a server accepting and a worker connecting.
    /// Returns the acceptor's confirm frame and the connector's final step.
    fn handshake(
        acceptor_secret: &Secret,
        connector_secret: &Secret,
        acceptor_nonce: Nonce,
        connector_nonce: Nonce,
    ) -> (Vec<u8>, Result<AuthStep, WireError>) {
        let (mut acceptor, challenge) = Acceptor::new(acceptor_secret, SERVER_0, acceptor_nonce);
        let mut connector = Connector::new(connector_secret, WORKER_2, connector_nonce);
        let response = send(connector.on_frame(&frame(&challenge)).unwrap());
        let AuthStep::Authenticated {
            peer,
            send: Some(confirm),
        } = acceptor.on_frame(&frame(&response)).unwrap()
        else {
            panic!("acceptor did not authenticate");
        };
        assert_eq!(peer, WORKER_2);
        let last = connector.on_frame(&frame(&confirm));
        (confirm, last)
    }

    #[test]
    fn same_secret_authenticates_both_sides() {
        let (_, last) = handshake(&secret(1), &secret(1), [10; 32], [20; 32]);
        assert_eq!(
            last.unwrap(),
            AuthStep::Authenticated {
                peer: SERVER_0,
                send: None
            }
        );
    }

    #[test]
    fn acceptor_rejects_a_connector_with_another_secret() {
        let (mut acceptor, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(2), WORKER_2, [20; 32]);
        let response = send(connector.on_frame(&frame(&challenge)).unwrap());
        let (peer, reason) = auth_failure(acceptor.on_frame(&frame(&response)));
        assert_eq!((peer, reason), (Some(WORKER_2), AuthFailure::BadMac));
    }

    #[test]
    fn connector_rejects_an_acceptor_with_another_secret() {
        // An impostor with secret 2 runs an honest handshake with a connector
        // that also has secret 2, then shows its confirm to a connector with
        // secret 1 that used the same nonces: the only difference is the key.
        let (impostor_confirm, _) = handshake(&secret(2), &secret(2), [10; 32], [20; 32]);
        let (_, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(1), WORKER_2, [20; 32]);
        send(connector.on_frame(&frame(&challenge)).unwrap());
        let (peer, reason) = auth_failure(connector.on_frame(&frame(&impostor_confirm)));
        assert_eq!((peer, reason), (Some(SERVER_0), AuthFailure::BadMac));
    }

    #[test]
    fn a_recorded_response_fails_against_a_fresh_challenge() {
        let (mut first, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(1), WORKER_2, [20; 32]);
        let recorded = send(connector.on_frame(&frame(&challenge)).unwrap());
        assert!(matches!(
            first.on_frame(&frame(&recorded)),
            Ok(AuthStep::Authenticated { .. })
        ));

        let (mut second, _) = Acceptor::new(&secret(1), SERVER_0, [11; 32]);
        let (_, reason) = auth_failure(second.on_frame(&frame(&recorded)));
        assert_eq!(reason, AuthFailure::BadMac);
    }

    #[test]
    fn a_recorded_confirm_fails_for_a_fresh_connector_nonce() {
        let (recorded, _) = handshake(&secret(1), &secret(1), [10; 32], [20; 32]);
        let (_, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(1), WORKER_2, [21; 32]);
        send(connector.on_frame(&frame(&challenge)).unwrap());
        let (_, reason) = auth_failure(connector.on_frame(&frame(&recorded)));
        assert_eq!(reason, AuthFailure::BadMac);
    }

    #[test]
    fn a_reflected_nonce_is_rejected_by_both_sides() {
        let (_, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(1), WORKER_2, [10; 32]);
        assert_eq!(
            auth_failure(connector.on_frame(&frame(&challenge))).1,
            AuthFailure::NonceReflected
        );

        // A peer that answers the challenge with the acceptor's own nonce.
        let (mut acceptor, _) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let echo = AuthMessage::Response {
            connector_nonce: [10; 32],
            connector: WORKER_2,
            mac: [0; MAC_BYTES],
        };
        let (_, reason) = auth_failure(acceptor.on_frame(&frame(&echo.encode(WORKER_2.rank))));
        assert_eq!(reason, AuthFailure::NonceReflected);
    }

    #[test]
    fn frame_sender_must_match_the_claimed_rank() {
        let (mut acceptor, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(1), WORKER_2, [20; 32]);
        let response = frame(&send(connector.on_frame(&frame(&challenge)).unwrap()));
        let forged = Frame {
            header: FrameHeader {
                sender: 3,
                ..response.header
            },
            payload: response.payload,
        };
        let (_, reason) = auth_failure(acceptor.on_frame(&forged));
        assert_eq!(
            reason,
            AuthFailure::SenderMismatch {
                header_rank: 3,
                claimed_rank: 2
            }
        );
    }

    #[test]
    fn ordinary_traffic_before_authentication_is_refused() {
        let (mut acceptor, _) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let control = encode_control(2, &"hello").unwrap();
        let (_, reason) = auth_failure(acceptor.on_frame(&frame(&control)));
        assert_eq!(
            reason,
            AuthFailure::UnexpectedMessage {
                expected: "response",
                got: "a control frame"
            }
        );

        let mut connector = Connector::new(&secret(1), WORKER_2, [20; 32]);
        let (_, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        send(connector.on_frame(&frame(&challenge)).unwrap());
        let (_, reason) = auth_failure(connector.on_frame(&frame(&challenge)));
        assert_eq!(
            reason,
            AuthFailure::UnexpectedMessage {
                expected: "confirm",
                got: "challenge"
            }
        );
    }

    #[test]
    fn a_finished_handshake_takes_no_more_frames() {
        let (mut acceptor, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(1), WORKER_2, [20; 32]);
        let response = send(connector.on_frame(&frame(&challenge)).unwrap());
        acceptor.on_frame(&frame(&response)).unwrap();
        assert_eq!(
            auth_failure(acceptor.on_frame(&frame(&response))).1,
            AuthFailure::Finished
        );
    }

    #[test]
    fn on_bytes_handles_fragments_and_leaves_later_traffic() {
        let (mut acceptor, challenge) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let mut connector = Connector::new(&secret(1), WORKER_2, [20; 32]);
        let mut response = None;
        for byte in challenge.chunks(1) {
            let mut input = byte;
            if let Some(step) = connector.on_bytes(&mut input).unwrap() {
                response = Some(send(step));
            }
        }
        let mut input = &response.unwrap()[..];
        let Some(AuthStep::Authenticated {
            send: Some(confirm), ..
        }) = acceptor.on_bytes(&mut input).unwrap()
        else {
            panic!("acceptor did not authenticate");
        };
        let later = encode_control(0, &"first control message").unwrap();
        let mut stream = confirm.clone();
        stream.extend_from_slice(&later);
        let mut input = &stream[..];
        let step = connector.on_bytes(&mut input).unwrap();
        assert_eq!(
            step,
            Some(AuthStep::Authenticated {
                peer: SERVER_0,
                send: None
            })
        );
        assert_eq!(input, &later[..]);
    }

    #[test]
    fn on_bytes_refuses_large_frames_before_buffering_them() {
        let (mut acceptor, _) = Acceptor::new(&secret(1), SERVER_0, [10; 32]);
        let big = encode_control(2, &vec![0u8; 1000]).unwrap();
        let error = acceptor.on_bytes(&mut &big[..HEADER_BYTES]).unwrap_err();
        assert!(
            matches!(
                error,
                WireError::DecoderLimit {
                    max: AUTH_PAYLOAD_BYTES_MAX,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn secrets_are_checked_and_redacted() {
        let error = Secret::new(vec![1; 15]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "secret from given bytes: 15 bytes, at least 16 needed"
        );
        assert_eq!(format!("{:?}", secret(7)), "Secret(<32 bytes, redacted>)");
    }

    #[test]
    fn secret_file_is_trimmed_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().bytes, b"0123456789abcdef0123");

        std::fs::write(&path, "short\n").unwrap();
        let error = Secret::from_file(&path).unwrap_err().to_string();
        assert!(
            error.contains(&path.display().to_string()) && error.contains("5 bytes"),
            "{error}"
        );

        std::fs::write(&path, vec![b'x'; SECRET_FILE_BYTES_MAX + 1]).unwrap();
        let error = Secret::from_file(&path).unwrap_err();
        assert!(matches!(error, WireError::SecretFileTooLarge { .. }), "{error:?}");

        let missing = dir.path().join("missing");
        let error = Secret::from_file(&missing).unwrap_err().to_string();
        assert!(error.contains(&missing.display().to_string()), "{error}");
    }

    #[test]
    fn secret_env_errors_name_the_variable() {
        let error = Secret::from_env_value("SINTER_SECRET", None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "secret: environment variable SINTER_SECRET is not set"
        );
        let error = Secret::from_env_value("SINTER_SECRET", Some("abc".into())).unwrap_err();
        assert!(
            error.to_string().contains("environment variable SINTER_SECRET"),
            "{error}"
        );
        let secret = Secret::from_env_value("SINTER_SECRET", Some("0123456789abcdef\n".into())).unwrap();
        assert_eq!(secret.bytes, b"0123456789abcdef");
    }
}
