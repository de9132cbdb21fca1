//! The network model: every node has one NIC of a given bandwidth, and every
//! pair of nodes one TCP stream that delivers in order.
//!
//! A message of `b` payload bytes becomes `(b + header) / wire_efficiency`
//! bytes on the wire (the frame header, then TCP/IP/Ethernet framing: 1448
//! payload bytes per 1514-byte frame with a 1500-byte MTU). It waits for the
//! sender's NIC (FIFO over all its streams, in the order messages are
//! handed to the network), is serialised at the sender's rate, travels for
//! the latency, and is serialised again into the receiver's NIC, which is
//! FIFO too (incast at a parameter server queues there). Bytes pipeline
//! through the two NICs (cut-through): an uncontended message arrives
//! `latency + wire_bytes / bandwidth` after it starts.
//!
//! Faults add delay after the receiving NIC (jitter; retransmission after a
//! loss; a partition holds the stream until it heals), and a stream never
//! delivers out of order: a delayed message holds back the ones behind it,
//! as TCP's head-of-line blocking does. Messages on different streams are
//! reordered freely.

use crate::queue::Nanos;

/// 1448 payload bytes in a 1514-byte Ethernet frame (1500 MTU, TCP timestamps on).
pub const WIRE_EFFICIENCY_DEFAULT: f64 = 1448.0 / 1514.0;

/// Link parameters shared by every node unless overridden.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    /// Each NIC's rate, each way (full duplex), in bits per second.
    pub bandwidth_bits_per_s: f64,
    /// One-way propagation and switching delay.
    pub latency_ns: Nanos,
    /// Payload bytes per byte on the wire.
    pub wire_efficiency: f64,
    /// Bytes of framing added to every message (the wire crate's frame header).
    pub header_bytes: u64,
}

impl LinkSpec {
    pub fn new(bandwidth_bits_per_s: f64, latency_ns: Nanos) -> Self {
        LinkSpec {
            bandwidth_bits_per_s,
            latency_ns,
            wire_efficiency: WIRE_EFFICIENCY_DEFAULT,
            header_bytes: wire::HEADER_BYTES as u64,
        }
    }
}

/// When a message handed to the network at some time starts leaving the
/// sender, has left it, and arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transit {
    /// The sender's NIC starts on it (the runtime reads the buffer then).
    pub start: Nanos,
    /// The last byte has left the sender.
    pub sent: Nanos,
    /// The last byte is at the receiver, after any fault delay.
    pub arrive: Nanos,
}

pub struct Network {
    spec: LinkSpec,
    ns_per_wire_byte: Vec<f64>,
    egress_free: Vec<Nanos>,
    ingress_free: Vec<Nanos>,
    /// Last arrival per stream, keyed `from << 32 | to`. Looked up, never iterated.
    streams: ps::shard::MixMap<u64, Nanos>,
    bytes: u64,
    messages: u64,
}

impl Network {
    pub fn new(nodes: usize, spec: LinkSpec) -> Self {
        let per_byte = 8e9 / spec.bandwidth_bits_per_s;
        Network {
            spec,
            ns_per_wire_byte: vec![per_byte; nodes],
            egress_free: vec![0; nodes],
            ingress_free: vec![0; nodes],
            streams: ps::shard::MixMap::default(),
            bytes: 0,
            messages: 0,
        }
    }

    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    /// Bytes on the wire for `payload_bytes` of message.
    pub fn wire_bytes(&self, payload_bytes: u64) -> f64 {
        (payload_bytes + self.spec.header_bytes) as f64 / self.spec.wire_efficiency
    }

    /// Hands a message to the network at `now`; `extra_ns` is the fault delay.
    pub fn transmit(&mut self, now: Nanos, from: u32, to: u32, payload_bytes: u64, extra_ns: Nanos) -> Transit {
        let wire = self.wire_bytes(payload_bytes);
        self.bytes += wire as u64;
        self.messages += 1;
        let (f, t) = (from as usize, to as usize);
        let out_ns = (wire * self.ns_per_wire_byte[f]).ceil() as Nanos;
        let in_ns = (wire * self.ns_per_wire_byte[t]).ceil() as Nanos;
        let start = now.max(self.egress_free[f]);
        let sent = start + out_ns;
        self.egress_free[f] = sent;
        let lat = self.spec.latency_ns;
        let in_start = (start + lat).max(self.ingress_free[t]);
        let in_end = (in_start + in_ns).max(sent + lat);
        self.ingress_free[t] = in_end;
        let last = self.streams.entry(u64::from(from) << 32 | u64::from(to)).or_insert(0);
        let arrive = (in_end + extra_ns).max(*last);
        *last = arrive;
        Transit { start, sent, arrive }
    }

    /// Forgets the streams of a node whose connections were torn down.
    pub fn reset_streams(&mut self) {
        self.streams.clear();
    }

    /// Wire bytes and messages carried so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.bytes, self.messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LinkSpec {
        LinkSpec {
            bandwidth_bits_per_s: 8e9, // 1 byte per ns
            latency_ns: 100,
            wire_efficiency: 1.0,
            header_bytes: 0,
        }
    }

    #[test]
    fn an_uncontended_message_takes_latency_plus_serialisation() {
        let mut n = Network::new(3, spec());
        let t = n.transmit(10, 0, 1, 1000, 0);
        assert_eq!(
            t,
            Transit {
                start: 10,
                sent: 1010,
                arrive: 1110
            }
        );
    }

    #[test]
    fn the_sender_nic_queues_and_incast_queues_at_the_receiver() {
        let mut n = Network::new(3, spec());
        let a = n.transmit(0, 0, 2, 1000, 0);
        let b = n.transmit(0, 0, 1, 1000, 0);
        assert_eq!(b.start, a.sent, "one NIC sends one message at a time");
        let c = n.transmit(0, 1, 2, 1000, 0);
        assert_eq!(c.arrive, a.arrive + 1000, "two senders into one receiver share its NIC");
    }

    #[test]
    fn a_delayed_message_holds_back_its_stream_but_not_others() {
        let mut n = Network::new(3, spec());
        let slow = n.transmit(0, 0, 1, 10, 5_000);
        let behind = n.transmit(0, 0, 1, 10, 0);
        assert_eq!(behind.arrive, slow.arrive, "in order on one stream");
        let other = n.transmit(0, 2, 1, 10, 0);
        assert!(other.arrive < slow.arrive, "another stream overtakes");
    }
}
