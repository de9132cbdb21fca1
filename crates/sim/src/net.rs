//! The network model: every node has one NIC of a given bandwidth, and every
//! pair of nodes one TCP stream that delivers in order.
//!
//! A message of `b` payload bytes becomes `(b + header) / wire_efficiency`
//! bytes on the wire (the frame header, then TCP/IP/Ethernet framing: 1448
//! payload bytes per 1514-byte frame with a 1500-byte MTU). It is serialised
//! at the sender's rate, travels for the latency, and is serialised again into
//! the receiver's NIC (incast at a parameter server queues there). Bytes
//! pipeline through the two NICs (cut-through): an uncontended message arrives
//! `latency + wire_bytes / bandwidth` after it starts.
//!
//! Each NIC may be a token bucket, as Linux's `tbf` shapes a link
//! ([`LinkSpec::burst_bytes`]): a NIC that was idle has saved up to `burst`
//! bytes, which leave at once; only the rest waits for the rate. A 1 MB
//! message after a pause on a 1 Gbit/s link with a 256 KB bucket takes 7 ms,
//! not 9 (measured with TCP ping-pong between network namespaces, 2026-12-06).
//! With a peak rate (`tbf ... peakrate P mtu M`), only the smaller of `burst`
//! and `M` leaves at once, and the rest of the bucket at about the rate: that
//! smaller figure is the bucket to give here.
//! A real NIC has no bucket (`burst_bytes = 0`).
//!
//! Two ways to share a NIC between streams:
//!
//! - [`Network`]: FIFO over all its streams, in the order messages are
//!   handed to the network, each message reserved whole when it is sent.
//!   Exact, and fast enough for 4,096 ranks, when a node sends on one stream
//!   at a time, as the collectives do (a ring sends only to its right).
//! - [`SharedNetwork`]: the streams active on a NIC share it fairly, as TCP
//!   flows through one bottleneck queue do: an egress NIC sends one chunk of
//!   each active stream in turn, and chunks from several senders queue at a
//!   receiving NIC in the order they arrive. A parameter-server shard that
//!   answers W pulls at once sends them side by side, so they all finish
//!   near the end (measured: the two 1 MB pulls of a 2-worker BSP step at
//!   100 Mbit/s finished about 164 and 178 ms after the shard wrote them, not
//!   90 and 180).
//!
//! Faults add delay after the receiving NIC (jitter; retransmission after a
//! loss; a partition holds the stream until it heals), and a stream never
//! delivers out of order: a delayed message holds back the ones behind it,
//! as TCP's head-of-line blocking does. Messages on different streams are
//! reordered freely.

use std::collections::VecDeque;

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
    /// Bytes each NIC sends at once after a pause, each way (`tbf`'s `burst`,
    /// or with a peak rate the smaller of `burst` and its `mtu`); 0: none.
    pub burst_bytes: u64,
}

impl LinkSpec {
    pub fn new(bandwidth_bits_per_s: f64, latency_ns: Nanos) -> Self {
        LinkSpec {
            bandwidth_bits_per_s,
            latency_ns,
            wire_efficiency: WIRE_EFFICIENCY_DEFAULT,
            header_bytes: wire::HEADER_BYTES as u64,
            burst_bytes: 0,
        }
    }

    /// Bytes on the wire for `payload_bytes` of message.
    pub fn wire_bytes(&self, payload_bytes: u64) -> f64 {
        (payload_bytes + self.header_bytes) as f64 / self.wire_efficiency
    }
}

/// One NIC direction's token bucket: `burst` bytes of credit that refills at
/// the link rate while the NIC sends less than that.
#[derive(Clone, Debug)]
struct Bucket {
    burst_bytes: f64,
    ns_per_byte: f64,
    tokens: f64,
    /// When `tokens` was last brought up to date; the NIC is busy until then.
    at: Nanos,
}

impl Bucket {
    fn new(burst_bytes: u64, ns_per_byte: f64) -> Bucket {
        Bucket {
            burst_bytes: burst_bytes as f64,
            ns_per_byte,
            tokens: burst_bytes as f64,
            at: 0,
        }
    }

    /// Nanoseconds to serialise `wire` bytes starting at `start` (not before
    /// the previous ones left): saved credit goes at once, the rest at the rate.
    fn serialise(&mut self, start: Nanos, wire: f64) -> Nanos {
        if self.burst_bytes == 0.0 {
            return (wire * self.ns_per_byte).ceil() as Nanos;
        }
        let start = start.max(self.at);
        self.tokens = (self.tokens + (start - self.at) as f64 / self.ns_per_byte).min(self.burst_bytes);
        let from_credit = self.tokens.min(wire);
        self.tokens -= from_credit;
        let ns = ((wire - from_credit) * self.ns_per_byte).ceil() as Nanos;
        self.at = start + ns;
        ns
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

/// FIFO NICs, each message reserved whole when it is handed over.
pub struct Network {
    spec: LinkSpec,
    egress_free: Vec<Nanos>,
    ingress_free: Vec<Nanos>,
    egress_bucket: Vec<Bucket>,
    ingress_bucket: Vec<Bucket>,
    /// Last arrival per stream, keyed `from << 32 | to`. Looked up, never iterated.
    streams: ps::shard::MixMap<u64, Nanos>,
    bytes: u64,
    messages: u64,
}

impl Network {
    pub fn new(nodes: usize, spec: LinkSpec) -> Self {
        let per_byte = 8e9 / spec.bandwidth_bits_per_s;
        let bucket = Bucket::new(spec.burst_bytes, per_byte);
        Network {
            egress_free: vec![0; nodes],
            ingress_free: vec![0; nodes],
            egress_bucket: vec![bucket.clone(); nodes],
            ingress_bucket: vec![bucket; nodes],
            spec,
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
        self.spec.wire_bytes(payload_bytes)
    }

    /// Hands a message to the network at `now`; `extra_ns` is the fault delay.
    pub fn transmit(&mut self, now: Nanos, from: u32, to: u32, payload_bytes: u64, extra_ns: Nanos) -> Transit {
        let wire = self.wire_bytes(payload_bytes);
        self.bytes += wire as u64;
        self.messages += 1;
        let (f, t) = (from as usize, to as usize);
        let start = now.max(self.egress_free[f]);
        let out_ns = self.egress_bucket[f].serialise(start, wire);
        let sent = start + out_ns;
        self.egress_free[f] = sent;
        let lat = self.spec.latency_ns;
        let in_start = (start + lat).max(self.ingress_free[t]);
        let in_ns = self.ingress_bucket[t].serialise(in_start, wire);
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

/// Smallest chunk [`SharedNetwork`] interleaves: 64 KiB, 0.5 ms at 1 Gbit/s.
pub const CHUNK_BYTES_MIN: f64 = 65_536.0;
/// Most chunks a message is cut into, so that a 6 MB push at 4,096 workers
/// costs 16 events, not 100.
pub const CHUNKS_PER_MESSAGE_MAX: f64 = 16.0;

/// The egress NIC finished a chunk; hand it to [`SharedNetwork::on_egress_done`] at that time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressDone {
    pub node: u32,
}

/// What a [`SharedNetwork`] call asks of the caller: schedule `next` (the
/// egress NIC's next chunk boundary), and deliver each `(time, token)`.
#[derive(Debug)]
pub struct Scheduled<T> {
    pub next: Option<(Nanos, EgressDone)>,
    pub delivered: Option<(Nanos, T)>,
}

struct Message<T> {
    wire_left: f64,
    chunk: f64,
    token: T,
}

struct Stream<T> {
    to: u32,
    queue: VecDeque<Message<T>>,
    /// In its egress NIC's round-robin.
    ready: bool,
    last_arrive: Nanos,
}

struct Egress {
    /// Streams with bytes to send, in round-robin order.
    ready: VecDeque<usize>,
    busy: bool,
    bucket: Bucket,
}

/// NICs shared fairly by the streams active on them (see the module docs),
/// for traffic where a node talks to many peers at once: parameter servers.
/// Each message carries a caller's token, handed back with its arrival time.
pub struct SharedNetwork<T> {
    spec: LinkSpec,
    egress: Vec<Egress>,
    ingress_free: Vec<Nanos>,
    ingress_bucket: Vec<Bucket>,
    streams: Vec<Stream<T>>,
    /// Stream index by `from << 32 | to`. Looked up, never iterated.
    stream_of: ps::shard::MixMap<u64, usize>,
}

impl<T> SharedNetwork<T> {
    pub fn new(nodes: usize, spec: LinkSpec) -> Self {
        let bucket = Bucket::new(spec.burst_bytes, 8e9 / spec.bandwidth_bits_per_s);
        SharedNetwork {
            egress: (0..nodes)
                .map(|_| Egress {
                    ready: VecDeque::new(),
                    busy: false,
                    bucket: bucket.clone(),
                })
                .collect(),
            ingress_free: vec![0; nodes],
            ingress_bucket: vec![bucket; nodes],
            streams: Vec::new(),
            stream_of: ps::shard::MixMap::default(),
            spec,
        }
    }

    /// Hands a message of `payload_bytes` from `from` to `to` to the network at `now`.
    pub fn send(&mut self, now: Nanos, from: u32, to: u32, payload_bytes: u64, token: T) -> Scheduled<T> {
        let key = u64::from(from) << 32 | u64::from(to);
        let next_index = self.streams.len();
        let index = *self.stream_of.entry(key).or_insert(next_index);
        if index == next_index {
            self.streams.push(Stream {
                to,
                queue: VecDeque::new(),
                ready: false,
                last_arrive: 0,
            });
        }
        let wire = self.spec.wire_bytes(payload_bytes);
        let stream = &mut self.streams[index];
        stream.queue.push_back(Message {
            wire_left: wire,
            chunk: (wire / CHUNKS_PER_MESSAGE_MAX).max(CHUNK_BYTES_MIN),
            token,
        });
        let egress = &mut self.egress[from as usize];
        if !stream.ready {
            stream.ready = true;
            egress.ready.push_back(index);
        }
        if egress.busy {
            return Scheduled {
                next: None,
                delivered: None,
            };
        }
        self.next_chunk(now, from)
    }

    /// The egress NIC of `done.node` finished a chunk at `now`: it starts the next.
    pub fn on_egress_done(&mut self, now: Nanos, done: EgressDone) -> Scheduled<T> {
        self.egress[done.node as usize].busy = false;
        self.next_chunk(now, done.node)
    }

    /// Sends one chunk of the next stream in `node`'s round-robin.
    fn next_chunk(&mut self, now: Nanos, node: u32) -> Scheduled<T> {
        let egress = &mut self.egress[node as usize];
        let Some(index) = egress.ready.pop_front() else {
            return Scheduled {
                next: None,
                delivered: None,
            };
        };
        let stream = &mut self.streams[index];
        let message = stream.queue.front_mut().expect("a ready stream has a message");
        let bytes = message.chunk.min(message.wire_left);
        message.wire_left -= bytes;
        let out_ns = egress.bucket.serialise(now, bytes);
        egress.busy = true;
        let to = stream.to as usize;
        let lat = self.spec.latency_ns;
        let in_start = (now + lat).max(self.ingress_free[to]);
        let in_ns = self.ingress_bucket[to].serialise(in_start, bytes);
        let in_end = (in_start + in_ns).max(now + out_ns + lat);
        self.ingress_free[to] = in_end;
        let mut delivered = None;
        if message.wire_left <= 0.0 {
            let message = stream.queue.pop_front().expect("checked above");
            let arrive = in_end.max(stream.last_arrive);
            stream.last_arrive = arrive;
            delivered = Some((arrive, message.token));
        }
        if stream.queue.is_empty() {
            stream.ready = false;
        } else {
            egress.ready.push_back(index);
        }
        Scheduled {
            next: Some((now + out_ns, EgressDone { node })),
            delivered,
        }
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
            burst_bytes: 0,
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

    #[test]
    fn a_token_bucket_sends_its_credit_at_once_and_refills_at_the_rate() {
        let mut n = Network::new(
            2,
            LinkSpec {
                burst_bytes: 600,
                ..spec()
            },
        );
        // 600 bytes of credit at each NIC: 400 of 1,000 bytes wait for the rate.
        let first = n.transmit(0, 0, 1, 1000, 0);
        assert_eq!((first.sent, first.arrive), (400, 500));
        // Back to back, the buckets are empty: the whole message at the rate.
        let second = n.transmit(first.sent, 0, 1, 1000, 0);
        assert_eq!(second.sent - second.start, 1000);
        // After 300 ns of silence, 300 bytes of credit.
        let third = n.transmit(second.sent + 300, 0, 1, 1000, 0);
        assert_eq!(third.sent - third.start, 700);
    }

    /// Drives a [`SharedNetwork`] as a simulator would; returns each token's arrival.
    fn run_shared(net: &mut SharedNetwork<u32>, sends: &[(Nanos, u32, u32, u64)]) -> Vec<(u32, Nanos)> {
        let mut q = crate::queue::Queue::new();
        for (i, &(at, from, to, bytes)) in sends.iter().enumerate() {
            q.push(at, (Some((from, to, bytes, i as u32)), None));
        }
        let mut arrived = Vec::new();
        while let Some((now, ev)) = q.pop() {
            let s = match ev {
                (Some((from, to, bytes, token)), _) => net.send(now, from, to, bytes, token),
                (None, Some(done)) => net.on_egress_done(now, done),
                (None, None) => unreachable!(),
            };
            if let Some((at, done)) = s.next {
                q.push(at, (None, Some(done)));
            }
            if let Some((at, token)) = s.delivered {
                arrived.push((token, at));
            }
        }
        arrived.sort_unstable();
        arrived
    }

    #[test]
    fn streams_share_a_nic_fairly_and_one_stream_runs_at_the_full_rate() {
        let mb = 1_000_000;
        // Alone: latency plus serialisation, as through `Network`.
        let alone = run_shared(&mut SharedNetwork::new(3, spec()), &[(0, 0, 1, mb)]);
        assert_eq!(alone, vec![(0, 100 + mb)]);
        // Two messages out of one NIC at once finish together (to within two
        // chunks), at twice the time.
        let together = |at: Nanos| at > 2 * mb - 2 * CHUNK_BYTES_MIN as u64 && at <= 2 * mb + 100;
        let out = run_shared(&mut SharedNetwork::new(3, spec()), &[(0, 0, 1, mb), (0, 0, 2, mb)]);
        assert!(out.iter().all(|&(_, at)| together(at)), "{out:?}");
        // Two senders into one NIC (incast) share it the same way.
        let incast = run_shared(&mut SharedNetwork::new(3, spec()), &[(0, 0, 2, mb), (0, 1, 2, mb)]);
        assert!(incast.iter().all(|&(_, at)| together(at)), "{incast:?}");
        // One stream delivers in order.
        let order = run_shared(&mut SharedNetwork::new(2, spec()), &[(0, 0, 1, mb), (1, 0, 1, 10)]);
        assert!(order[1].1 >= order[0].1, "{order:?}");
    }
}
