//! Which rows each worker of a synchronous job trains on in one epoch, and how
//! far it got: an [`EpochPlan`] survives a change of membership in the middle
//! of the epoch, so that every row is still trained on once.
//!
//! At the start of an epoch the rows are cut into `world` contiguous balanced
//! partitions (the partition a worker reads), each shuffled with the epoch's
//! seed; the global batch is cut into local batches the same way. Step `k`
//! of rank `r` takes rows `k·b_r .. (k+1)·b_r` of its queue. All ranks take
//! the same number of steps (the lock-step all-reduce needs it), so the rows
//! past the shortest queue's last full batch are not trained on this epoch.
//!
//! When the membership changes, every old rank's untrained rows are known to
//! every member from the plan alone (a completed synchronous step consumed
//! every rank's batch). [`EpochPlan::regroup`] keeps each survivor's own
//! remaining rows (its partition stays where it is), shares the lost workers'
//! rows out, and moves rows from the longest queues to joiners until the
//! queues differ by at most one row.
//!
//! **Invariants:** the rows of a plan's queues and the rows already trained
//! this epoch are disjoint and together are the epoch's rows; `batches` sums to
//! the global batch.

use std::ops::Range;

use tensor::Rng;

/// Rows a plan may hold: row indices are stored as `u32`.
pub const PLAN_ROWS_MAX: usize = u32::MAX as usize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    /// Rows not yet trained on, by rank, in training order (from `done · batch`).
    queues: Vec<Vec<u32>>,
    /// Rows per step, by rank.
    batches: Vec<usize>,
    /// Steps taken since the queues were set.
    done: u64,
}

/// What a [`EpochPlan::regroup`] did with the rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reassigned {
    /// Rows of lost workers given to others.
    pub lost_rows: usize,
    /// Rows moved from a survivor to a joiner.
    pub moved_rows: usize,
}

impl EpochPlan {
    /// The plan of epoch `epoch` for `world` workers over `rows` rows, the
    /// order seeded by `seed`.
    pub fn new(rows: usize, world: u32, global_batch: usize, seed: u64, epoch: u32) -> Self {
        assert!(rows <= PLAN_ROWS_MAX, "{rows} rows do not fit a plan");
        let batches = local_batches(global_batch, world.max(1) as usize);
        let queues = partitions(rows, world, global_batch)
            .into_iter()
            .map(|part| epoch_order(part, seed, epoch))
            .collect();
        Self {
            queues,
            batches,
            done: 0,
        }
    }

    /// Workers the plan is for.
    pub fn world(&self) -> u32 {
        self.queues.len() as u32
    }

    /// Rows per step of `rank`.
    pub fn batch_rows(&self, rank: u32) -> usize {
        self.batches[rank as usize]
    }

    /// Steps since the queues were set.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Steps the plan holds in all (done and to do): every rank can fill this many batches.
    pub fn steps(&self) -> u64 {
        self.queues
            .iter()
            .zip(&self.batches)
            .filter_map(|(q, &b)| q.len().checked_div(b))
            .min()
            .unwrap_or(0) as u64
    }

    /// Steps left.
    pub fn left(&self) -> u64 {
        self.steps().saturating_sub(self.done)
    }

    /// The rows of `rank`'s step `done + ahead`, if the plan has that step.
    pub fn batch(&self, rank: u32, ahead: u64) -> Option<&[u32]> {
        let k = self.done + ahead;
        if k >= self.steps() {
            return None;
        }
        let b = self.batches[rank as usize];
        let start = k as usize * b;
        Some(&self.queues[rank as usize][start..start + b])
    }

    /// One step was taken by every rank.
    pub fn advance(&mut self) {
        debug_assert!(self.done < self.steps());
        self.done += 1;
    }

    /// Rows left untrained, by rank.
    pub fn remaining(&self, rank: u32) -> &[u32] {
        let b = self.batches[rank as usize];
        let q = &self.queues[rank as usize];
        &q[(self.done as usize * b).min(q.len())..]
    }

    /// The plan for a new membership: `previous[new_rank]` is that worker's
    /// rank in this plan (`None`: it joins now). The rest of the epoch keeps
    /// the global batch, cut over the new world.
    pub fn regroup(&self, previous: &[Option<u32>], global_batch: usize) -> (Self, Reassigned) {
        let world = previous.len().max(1);
        let mut queues: Vec<Vec<u32>> = previous
            .iter()
            .map(|p| p.map_or_else(Vec::new, |r| self.remaining(r).to_vec()))
            .collect();
        if queues.is_empty() {
            queues.push(Vec::new());
        }
        let kept: Vec<u32> = previous.iter().flatten().copied().collect();
        let mut pool: Vec<u32> = (0..self.world())
            .filter(|r| !kept.contains(r))
            .flat_map(|r| self.remaining(r).iter().copied())
            .collect();
        let lost_rows = pool.len();
        let total: usize = queues.iter().map(Vec::len).sum::<usize>() + pool.len();
        let batches = local_batches(global_batch, world);
        let targets = shares(total, &batches);
        // Over-full queues give their tails to the pool; then short queues take from it.
        let mut moved_rows = 0;
        for (q, &t) in queues.iter_mut().zip(&targets) {
            if q.len() > t {
                moved_rows += q.len() - t;
                pool.extend(q.drain(t..));
            }
        }
        moved_rows = moved_rows.min(total - lost_rows);
        let mut from = pool.into_iter();
        for (q, &t) in queues.iter_mut().zip(&targets) {
            while q.len() < t {
                q.push(from.next().expect("targets sum to the rows held"));
            }
        }
        debug_assert!(from.next().is_none());
        let plan = Self {
            queues,
            batches,
            done: 0,
        };
        (plan, Reassigned { lost_rows, moved_rows })
    }

    /// The plan as words (for a worker that joins or falls behind): world,
    /// done, then per rank its batch, queue length and untrained rows.
    pub fn encode(&self, out: &mut Vec<u64>) {
        out.push(self.world() as u64);
        for r in 0..self.world() {
            let rest = self.remaining(r);
            out.push(self.batches[r as usize] as u64);
            out.push(rest.len() as u64);
            out.extend(rest.iter().map(|&x| x as u64));
        }
    }

    /// Reads what [`Self::encode`] wrote from the front of `words`; returns the
    /// plan (its done steps start at 0) and the words left. Rows must be below `rows`.
    pub fn decode(words: &[u64], rows: usize) -> Result<(Self, &[u64]), String> {
        let (&world, mut rest) = words.split_first().ok_or("no plan")?;
        if world == 0 || world > 1 << 20 {
            return Err(format!("plan for {world} workers"));
        }
        let mut queues = Vec::with_capacity(world as usize);
        let mut batches = Vec::with_capacity(world as usize);
        for r in 0..world {
            let [b, n, tail @ ..] = rest else {
                return Err(format!("plan ends inside rank {r}"));
            };
            let n = usize::try_from(*n).map_err(|_| "queue length overflows")?;
            if n > tail.len() {
                return Err(format!("rank {r}'s queue of {n} rows is longer than the message"));
            }
            let q: Vec<u32> = tail[..n]
                .iter()
                .map(|&x| u32::try_from(x).ok().filter(|&x| (x as usize) < rows))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("rank {r}'s queue names a row outside the {rows} rows"))?;
            batches.push(usize::try_from(*b).map_err(|_| "batch overflows")?);
            queues.push(q);
            rest = &tail[n..];
        }
        Ok((
            Self {
                queues,
                batches,
                done: 0,
            },
            rest,
        ))
    }
}

/// The rows each rank's queue holds at the start of every epoch of
/// [`EpochPlan::new`]: `rows` cut into `world` contiguous ranges in proportion
/// to the local batches. The same for every epoch (only the order within a
/// range changes), so a worker of a job whose membership does not change can
/// read just its range of the file.
pub fn partitions(rows: usize, world: u32, global_batch: usize) -> Vec<Range<usize>> {
    let batches = local_batches(global_batch, world.max(1) as usize);
    let mut start = 0;
    shares(rows, &batches)
        .into_iter()
        .map(|n| {
            start += n;
            start - n..start
        })
        .collect()
}

/// The global batch cut into `world` local batches (balanced, larger first).
pub fn local_batches(global_batch: usize, world: usize) -> Vec<usize> {
    tensor::shard_ranges(global_batch, world)
        .iter()
        .map(Range::len)
        .collect()
}

/// `total` rows shared in proportion to `batches`, so that every rank runs out
/// of full batches at about the same step: fewer than two global batches of
/// rows are left untrained. Equal batches give `tensor::shard_ranges`'s sizes.
fn shares(total: usize, batches: &[usize]) -> Vec<usize> {
    let sum: usize = batches.iter().sum();
    if sum == 0 {
        return tensor::shard_ranges(total, batches.len().max(1))
            .iter()
            .map(Range::len)
            .collect();
    }
    let mut out: Vec<usize> = batches
        .iter()
        .map(|&b| ((total as u128 * b as u128) / sum as u128) as usize)
        .collect();
    let mut left = total - out.iter().sum::<usize>();
    for (o, &b) in out.iter_mut().zip(batches) {
        if left == 0 {
            break;
        }
        if b > 0 {
            *o += 1;
            left -= 1;
        }
    }
    out
}

/// A partition's rows in epoch `epoch`'s order.
fn epoch_order(part: Range<usize>, seed: u64, epoch: u32) -> Vec<u32> {
    let mut order: Vec<u32> = part.map(|r| r as u32).collect();
    Rng::derive(seed, 0xE90C ^ ((epoch as u64) << 20)).shuffle(&mut order);
    order
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn trained(plan: &EpochPlan, steps: u64) -> Vec<u32> {
        let mut out = Vec::new();
        for r in 0..plan.world() {
            let b = plan.batch_rows(r);
            out.extend_from_slice(&plan.queues[r as usize][..steps as usize * b]);
        }
        out
    }

    #[test]
    fn a_plan_matches_contiguous_balanced_partitions() {
        let p = EpochPlan::new(60_000, 2, 128, 0, 0);
        assert_eq!(p.steps(), 468);
        assert_eq!((p.batch_rows(0), p.batch_rows(1)), (64, 64));
        assert!(p.batch(0, 0).unwrap().iter().all(|&r| r < 30_000));
        assert!(p.batch(1, 0).unwrap().iter().all(|&r| r >= 30_000));
        assert_eq!(p.batch(0, 468), None);
    }

    proptest! {
        /// Every row is trained at most once, and all but fewer than a global
        /// batch per membership are trained, whatever the losses and joins.
        #[test]
        fn rows_are_trained_once_across_regroups(
            rows in 50usize..3000,
            world in 1u32..6,
            batch in 1usize..40,
            changes in proptest::collection::vec((0u64..40, proptest::collection::vec(any::<bool>(), 1..6), 0usize..3), 0..4),
        ) {
            let mut plan = EpochPlan::new(rows, world, batch, 7, 1);
            let mut seen = Vec::new();
            for (steps, keep, join) in changes {
                let steps = steps.min(plan.left());
                for _ in 0..steps { plan.advance(); }
                seen.extend(trained(&plan, plan.done()));
                let mut previous: Vec<Option<u32>> = (0..plan.world()).filter(|&r| keep[r as usize % keep.len()]).map(Some).collect();
                previous.extend(std::iter::repeat_n(None, join));
                if previous.is_empty() { previous.push(None); }
                let (next, _) = plan.regroup(&previous, batch);
                plan = next;
            }
            let steps = plan.left();
            for _ in 0..steps { plan.advance(); }
            seen.extend(trained(&plan, plan.done()));
            let n = seen.len();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), n, "a row was trained twice");
            prop_assert!(seen.iter().all(|&r| (r as usize) < rows));
            prop_assert!(rows - n < 2 * batch, "{} of {} rows trained", n, rows);
        }

        #[test]
        fn encode_then_decode_is_the_identity(rows in 1usize..500, world in 1u32..5, batch in 1usize..20, done in 0u64..10) {
            let mut plan = EpochPlan::new(rows, world, batch, 3, 0);
            for _ in 0..done.min(plan.left()) { plan.advance(); }
            let mut words = Vec::new();
            plan.encode(&mut words);
            words.push(99);
            let (back, rest) = EpochPlan::decode(&words, rows).unwrap();
            prop_assert_eq!(rest, &[99u64][..]);
            for r in 0..world {
                prop_assert_eq!(back.remaining(r), plan.remaining(r));
                prop_assert_eq!(back.batch_rows(r), plan.batch_rows(r));
            }
        }

        #[test]
        fn decode_never_panics(words in proptest::collection::vec(any::<u64>(), 0..40), rows in 0usize..100) {
            let _ = EpochPlan::decode(&words, rows);
        }
    }

    proptest! {
        /// Each rank's queue is exactly its partition, in every epoch, and the
        /// partitions tile the rows in rank order.
        #[test]
        fn queues_are_the_partitions(rows in 0usize..2000, world in 1u32..7, batch in 1usize..50, epoch in 0u32..3) {
            let parts = partitions(rows, world, batch);
            prop_assert_eq!(parts.len(), world as usize);
            prop_assert_eq!(parts.first().map_or(0, |p| p.start), 0);
            prop_assert_eq!(parts.last().map_or(0, |p| p.end), rows);
            prop_assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
            let plan = EpochPlan::new(rows, world, batch, 5, epoch);
            for (r, part) in parts.iter().enumerate() {
                let mut q = plan.queues[r].clone();
                q.sort_unstable();
                prop_assert_eq!(q, part.clone().map(|x| x as u32).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn a_lost_workers_rows_go_to_the_survivors_and_a_joiner_gets_an_even_share() {
        let mut p = EpochPlan::new(1200, 3, 30, 1, 0);
        for _ in 0..10 {
            p.advance();
        }
        // Rank 1 is lost; 300 rows left per rank.
        let (q, r) = p.regroup(&[Some(0), Some(2)], 30);
        assert_eq!(r.lost_rows, 300);
        assert_eq!(q.remaining(0).len(), 450);
        assert_eq!(
            &q.remaining(0)[..300],
            p.remaining(0),
            "a survivor keeps its own rows first"
        );
        assert_eq!(q.steps(), 30);
        let (j, r) = q.regroup(&[Some(0), Some(1), None], 30);
        assert_eq!(r.lost_rows, 0);
        assert_eq!(r.moved_rows, 300);
        assert_eq!(j.remaining(2).len(), 300);
    }
}
