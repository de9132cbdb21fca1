//! Fuzz target: the `Acceptor` and `Connector` handshakes against a scripted
//! peer that mixes the genuine messages of a peer holding a secret (under any
//! identity, nonce, sender rank or tag), forged auth messages, frames of every
//! type whose length and crc may lie, and raw bytes, cut into reads of any size.
//!
//! The contract checked: an error never panics and ends the handshake; a
//! finished or failed handshake refuses every later call and takes no byte;
//! `Ok(None)` comes only once the read is used up; a peer is authenticated only
//! by a proof made with the same secret, after exactly the handshake's frames
//! (one for the acceptor, two for the connector) and not a byte more; what the
//! handshake asks to send is one auth frame that an honest peer accepts.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use wire::{
    AUTH_PAYLOAD_BYTES_MAX, Acceptor, AuthFailure, AuthStep, Connector, Frame, FrameDecoder, FrameHeader, HEADER_BYTES,
    MessageType, Nonce, PeerInfo, Role, Secret, WireError, payload_crc,
};

/// A whole test: the side under test, both secrets, both identities, what the
/// peer sends and how the bytes are cut into reads.
#[derive(Arbitrary, Debug)]
struct Script {
    accepting: bool,
    secret: Vec<u8>,
    /// `Some((at, xor))`: the peer's secret is ours with byte `at` changed.
    peer_secret_flip: Option<(u8, u8)>,
    own: Identity,
    peer: Identity,
    pieces: Vec<Piece>,
    /// Sizes of the reads, zero included; the rest of the stream is one read.
    reads: Vec<u16>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Identity {
    role: AuthRole,
    rank: u32,
    nonce: Nonce,
}

impl Identity {
    fn info(self) -> PeerInfo {
        self.role.peer(self.rank)
    }
}

#[derive(Arbitrary, Debug)]
enum Piece {
    /// The next message of a peer that holds the peer secret, with a valid
    /// proof: for a connector under test the challenge (`late` false) or the
    /// confirm (`late` true), for an acceptor the response. `as_peer` replaces
    /// the peer's identity and nonce; `sender` rewrites the frame's sender rank.
    Genuine {
        late: bool,
        as_peer: Option<Identity>,
        sender: Option<u32>,
        tag: u64,
    },
    /// A well-framed auth message with any fields; its proof is made up.
    Forged {
        message: AuthMessage,
        sender: u32,
        tag: u64,
        trailing: Vec<u8>,
    },
    /// A frame of any type around any payload; the declared length and the
    /// payload crc may lie.
    Framed {
        kind: u8,
        flags: u16,
        tag: u64,
        sender: u32,
        payload: Vec<u8>,
        declared_bytes: Option<u32>,
        crc_xor: u32,
    },
    /// Bytes as they come.
    Raw(Vec<u8>),
}

/// `wire::auth`'s private message type, field for field, so that postcard
/// encodes both alike.
#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum AuthMessage {
    Challenge {
        acceptor_nonce: Nonce,
    },
    Response {
        connector_nonce: Nonce,
        connector: AuthPeer,
        mac: [u8; 32],
    },
    Confirm {
        acceptor: AuthPeer,
        mac: [u8; 32],
    },
}

/// `wire::PeerInfo`, field for field.
#[derive(Arbitrary, Debug, Clone, Copy, Serialize, Deserialize)]
struct AuthPeer {
    role: AuthRole,
    rank: u32,
}

/// `wire::Role`, variant for variant.
#[derive(Arbitrary, Debug, Clone, Copy, Serialize, Deserialize)]
enum AuthRole {
    Coordinator,
    Server,
    Worker,
    Launcher,
}

impl AuthRole {
    fn peer(self, rank: u32) -> PeerInfo {
        let role = match self {
            AuthRole::Coordinator => Role::Coordinator,
            AuthRole::Server => Role::Server,
            AuthRole::Worker => Role::Worker,
            AuthRole::Launcher => Role::Launcher,
        };
        PeerInfo { role, rank }
    }
}

impl AuthPeer {
    fn info(self) -> PeerInfo {
        self.role.peer(self.rank)
    }
}

/// The side under test.
enum Side {
    Acceptor(Acceptor),
    Connector(Connector),
}

impl Side {
    fn on_bytes(&mut self, input: &mut &[u8]) -> Result<Option<AuthStep>, WireError> {
        match self {
            Side::Acceptor(acceptor) => acceptor.on_bytes(input),
            Side::Connector(connector) => connector.on_bytes(input),
        }
    }
}

fuzz_target!(|script: Script| {
    let mut secret_bytes = script.secret.clone();
    secret_bytes.truncate(128);
    if secret_bytes.len() < wire::SECRET_BYTES_MIN {
        assert!(Secret::new(secret_bytes.clone()).is_err());
        secret_bytes.resize(32, 7);
    }
    let mut peer_bytes = secret_bytes.clone();
    if let Some((at, xor)) = script.peer_secret_flip {
        // Same length and a nonzero change, so the two are never the same HMAC key.
        peer_bytes[usize::from(at) % secret_bytes.len()] ^= xor | 1;
    }
    let same_secret = script.peer_secret_flip.is_none();
    let secret = Secret::new(secret_bytes).expect("at least SECRET_BYTES_MIN bytes");
    let peer_secret = Secret::new(peer_bytes).expect("at least SECRET_BYTES_MIN bytes");
    let own = script.own.info();

    let (mut side, challenge) = if script.accepting {
        let (acceptor, challenge) = Acceptor::new(&secret, own, script.own.nonce);
        (Side::Acceptor(acceptor), Some(challenge))
    } else {
        (Side::Connector(Connector::new(&secret, own, script.own.nonce)), None)
    };

    let mut stream = Vec::new();
    for piece in &script.pieces {
        match piece {
            Piece::Genuine {
                late,
                as_peer,
                sender,
                tag,
            } => {
                let peer = as_peer.unwrap_or(script.peer);
                let genuine = match &challenge {
                    Some(challenge) => genuine_response(&peer_secret, peer, challenge),
                    None if !late => Some(Acceptor::new(&peer_secret, peer.info(), peer.nonce).1),
                    None => genuine_confirm(&peer_secret, peer, script.own),
                };
                if let Some(frame) = genuine {
                    stream.extend(reframe(&frame, *sender, *tag));
                }
            }
            Piece::Forged {
                message,
                sender,
                tag,
                trailing,
            } => {
                let mut payload = postcard::to_allocvec(message).expect("auth messages encode");
                payload.extend_from_slice(trailing);
                payload.truncate(AUTH_PAYLOAD_BYTES_MAX as usize);
                let header = FrameHeader::new(MessageType::Auth, *tag, *sender, &payload).expect("within the auth limit");
                stream.extend_from_slice(&header.encode());
                stream.extend_from_slice(&payload);
            }
            Piece::Framed {
                kind,
                flags,
                tag,
                sender,
                payload,
                declared_bytes,
                crc_xor,
            } => {
                let header = FrameHeader {
                    kind: MessageType::ALL[usize::from(*kind) % MessageType::ALL.len()],
                    flags: *flags,
                    tag: *tag,
                    sender: *sender,
                    payload_bytes: declared_bytes.unwrap_or(payload.len() as u32),
                    payload_crc: payload_crc(payload) ^ crc_xor,
                };
                stream.extend_from_slice(&header.encode());
                stream.extend_from_slice(payload);
            }
            Piece::Raw(bytes) => stream.extend_from_slice(bytes),
        }
    }

    let mut cuts = Vec::new();
    let mut at = 0;
    for &read in &script.reads {
        let end = (at + usize::from(read)).min(stream.len());
        cuts.push(at..end);
        at = end;
    }
    cuts.push(at..stream.len());

    let mut consumed = 0;
    let mut sent: Option<Vec<u8>> = None;
    let mut stopped = false;
    'reads: for cut in cuts {
        let mut input = &stream[cut.clone()];
        loop {
            let before = input.len();
            let result = side.on_bytes(&mut input);
            consumed += before - input.len();
            match result {
                Ok(None) => {
                    assert!(input.is_empty(), "more bytes asked for with {} unread", input.len());
                    break;
                }
                Ok(Some(AuthStep::Send(bytes))) => {
                    let Side::Connector(_) = side else {
                        panic!("the acceptor asked to send after its challenge");
                    };
                    assert!(sent.is_none(), "the connector answered twice");
                    let frames = whole_auth_frames(&stream[..consumed]);
                    assert_eq!(frames.len(), 1, "the connector answered after {} frames", frames.len());
                    check_response(&bytes, script.own);
                    sent = Some(bytes);
                }
                Ok(Some(AuthStep::Authenticated { peer, send })) => {
                    assert!(same_secret, "authenticated {peer} whose secret differs");
                    let frames = whole_auth_frames(&stream[..consumed]);
                    match (&side, &challenge) {
                        (Side::Acceptor(_), Some(challenge)) => {
                            assert_eq!(frames.len(), 1, "the acceptor authenticated after {} frames", frames.len());
                            let confirm = send.expect("the acceptor sends a confirm");
                            check_acceptor_outcome(&secret, script.own, peer, &frames[0], challenge, &confirm);
                        }
                        (Side::Connector(_), None) => {
                            assert_eq!(frames.len(), 2, "the connector authenticated after {} frames", frames.len());
                            assert!(send.is_none(), "the connector has nothing to send last");
                            let response = sent.as_deref().expect("the connector answered the challenge");
                            check_connector_outcome(&secret, script.own, peer, &frames, response);
                        }
                        _ => unreachable!("the acceptor alone has a challenge"),
                    }
                    stopped = true;
                    break 'reads;
                }
                Err(error) => {
                    let _ = error.to_string();
                    stopped = true;
                    break 'reads;
                }
            }
        }
    }

    // Once authenticated or failed, every call is refused and takes nothing.
    let rest = &stream[consumed..];
    let mut input = rest;
    let last = side.on_bytes(&mut input);
    if stopped {
        assert!(
            matches!(
                last,
                Err(WireError::AuthFailed {
                    peer: None,
                    reason: AuthFailure::Finished
                })
            ),
            "a stopped handshake answered {last:?}"
        );
        assert_eq!(input, rest, "a stopped handshake took bytes");
    }
});

/// The response of a connector with `secret` and identity `peer` to `challenge`,
/// or `None` if it refuses the challenge.
fn genuine_response(secret: &Secret, peer: Identity, challenge: &[u8]) -> Option<Vec<u8>> {
    let mut connector = Connector::new(secret, peer.info(), peer.nonce);
    match connector.on_bytes(&mut &challenge[..]) {
        Ok(Some(AuthStep::Send(response))) => Some(response),
        Err(WireError::AuthFailed {
            reason: AuthFailure::NonceReflected,
            ..
        }) => {
            assert_eq!(peer.nonce, challenge_nonce(challenge));
            None
        }
        other => panic!("a connector answered a genuine challenge with {other:?}"),
    }
}

/// The confirm an acceptor with `secret`, identity `peer` and `peer.nonce`
/// sends to the connector `own` that answered its challenge, or `None` if
/// the two refuse each other (equal nonces).
fn genuine_confirm(secret: &Secret, peer: Identity, own: Identity) -> Option<Vec<u8>> {
    let (mut acceptor, challenge) = Acceptor::new(secret, peer.info(), peer.nonce);
    let mut connector = Connector::new(secret, own.info(), own.nonce);
    let response = match connector.on_bytes(&mut &challenge[..]) {
        Ok(Some(AuthStep::Send(response))) => response,
        Err(_) if peer.nonce == own.nonce => return None,
        other => panic!("a connector answered a genuine challenge with {other:?}"),
    };
    match acceptor.on_bytes(&mut &response[..]) {
        Ok(Some(AuthStep::Authenticated {
            peer: connector,
            send: Some(confirm),
        })) => {
            assert_eq!(connector, own.info());
            Some(confirm)
        }
        // The response names the connector's rank in its header, so it always matches.
        other => panic!("an acceptor refused a genuine response with {other:?}"),
    }
}

fn challenge_nonce(challenge: &[u8]) -> Nonce {
    match postcard::from_bytes::<AuthMessage>(&challenge[HEADER_BYTES..]) {
        Ok(AuthMessage::Challenge { acceptor_nonce }) => acceptor_nonce,
        other => panic!("a challenge frame holds {other:?}"),
    }
}

/// `frame` (one whole frame) with its sender rank and tag replaced.
fn reframe(frame: &[u8], sender: Option<u32>, tag: u64) -> Vec<u8> {
    let frames = whole_auth_frames(frame);
    assert_eq!(frames.len(), 1);
    let Frame { header, payload } = &frames[0];
    let header = FrameHeader {
        sender: sender.unwrap_or(header.sender),
        tag,
        ..*header
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// Decodes `bytes` that must be whole auth frames and nothing else.
fn whole_auth_frames(bytes: &[u8]) -> Vec<Frame> {
    let mut decoder = FrameDecoder::with_payload_bytes_max(AUTH_PAYLOAD_BYTES_MAX);
    let mut input = bytes;
    let mut frames = Vec::new();
    while let Some(frame) = decoder.decode(&mut input).expect("the handshake took only valid frames") {
        assert_eq!(frame.header.kind, MessageType::Auth);
        frames.push(frame);
    }
    decoder.finish().expect("the handshake took whole frames");
    frames
}

fn auth_message(frame: &Frame) -> AuthMessage {
    postcard::from_bytes(&frame.payload).expect("an accepted frame holds an auth message")
}

/// What the connector `own` sends: one auth frame from its rank holding its
/// nonce and identity.
fn check_response(bytes: &[u8], own: Identity) {
    let frames = whole_auth_frames(bytes);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].header.sender, own.rank);
    match auth_message(&frames[0]) {
        AuthMessage::Response {
            connector_nonce,
            connector,
            ..
        } => {
            assert_eq!(connector_nonce, own.nonce);
            assert_eq!(connector.info(), own.info());
        }
        other => panic!("the connector answered with {other:?}"),
    }
}

/// The acceptor `own` authenticated `peer` from `response`: the claim matches
/// the frame, and the confirm it sends convinces that peer.
fn check_acceptor_outcome(
    secret: &Secret,
    own: Identity,
    peer: PeerInfo,
    response: &Frame,
    challenge: &[u8],
    confirm: &[u8],
) {
    let AuthMessage::Response {
        connector_nonce,
        connector,
        ..
    } = auth_message(response)
    else {
        panic!("the acceptor authenticated on another message");
    };
    assert_eq!(peer, connector.info());
    assert_eq!(response.header.sender, peer.rank);
    assert_ne!(connector_nonce, own.nonce);
    let mut honest = Connector::new(secret, peer, connector_nonce);
    assert!(matches!(
        honest.on_bytes(&mut &challenge[..]),
        Ok(Some(AuthStep::Send(_)))
    ));
    let mut input = confirm;
    let last = honest.on_bytes(&mut input);
    assert_eq!(
        last.ok(),
        Some(Some(AuthStep::Authenticated {
            peer: own.info(),
            send: None
        }))
    );
    assert!(input.is_empty());
}

/// The connector `own` authenticated `peer` after `frames` (challenge and
/// confirm): the claim matches the frame, and its response convinces that peer.
fn check_connector_outcome(secret: &Secret, own: Identity, peer: PeerInfo, frames: &[Frame], response: &[u8]) {
    let AuthMessage::Challenge { acceptor_nonce } = auth_message(&frames[0]) else {
        panic!("the connector answered another message than a challenge");
    };
    assert_ne!(acceptor_nonce, own.nonce);
    let AuthMessage::Confirm { acceptor, .. } = auth_message(&frames[1]) else {
        panic!("the connector authenticated on another message than a confirm");
    };
    assert_eq!(peer, acceptor.info());
    assert_eq!(frames[1].header.sender, peer.rank);
    let (mut honest, _) = Acceptor::new(secret, peer, acceptor_nonce);
    match honest.on_bytes(&mut &response[..]) {
        Ok(Some(AuthStep::Authenticated {
            peer: connector,
            send: Some(confirm),
        })) => {
            assert_eq!(connector, own.info());
            assert_eq!(&confirm[HEADER_BYTES..], &frames[1].payload[..], "the accepted confirm is not the honest one");
        }
        other => panic!("an honest acceptor refused the connector's response with {other:?}"),
    }
}
