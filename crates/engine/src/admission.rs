//! Who may join the batch: slots (`--max-batch` rows running or being prefilled), the KV token
//! budget (understanding: `--max-batch-tokens`, each request counted at prompt +
//! `max_new_tokens`) and a pause while the generation decode backlog is full. Pure
//! bookkeeping: the runners pop their queues and ask a [`Round`] about each request.
//!
//! Requests are taken in arrival order. A request that does not fit the token budget is held
//! at the head of the queue (nothing behind it overtakes it) until running rows free enough;
//! a request larger than the whole budget runs, alone, when nothing else is live.

/// The admission rule of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    /// Rows live at most (running + being prefilled); at least 1.
    pub slots: usize,
    /// KV slots reserved by live rows at most (`usize::MAX`: no token budget).
    pub tokens: usize,
}

/// What is live when a round of admission starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Load {
    /// Rows running or being prefilled.
    pub live: usize,
    /// KV slots they reserved.
    pub reserved: usize,
    /// Nothing may join now (generation: the decode backlog is full).
    pub paused: bool,
}

/// The answer for one offered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// It joins now.
    Admit,
    /// It waits at the head of the queue for budget; the round ends.
    Hold,
}

/// One admission round: offers in arrival order until a slot or the budget runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Round {
    free: usize,
    budget: usize,
    /// Nothing was live when the round started and nothing was admitted yet.
    alone: bool,
}

impl Admission {
    /// Starts a round against what is live now.
    pub fn round(&self, load: Load) -> Round {
        Round {
            free: if load.paused {
                0
            } else {
                self.slots.max(1).saturating_sub(load.live)
            },
            budget: self.tokens.saturating_sub(load.reserved),
            alone: load.live == 0,
        }
    }
}

impl Round {
    /// Slots still free in this round: how many requests may still be offered.
    pub fn free(&self) -> usize {
        self.free
    }

    /// Offers the next request in arrival order, needing `need` KV slots. Only call while
    /// [`Round::free`] is non-zero; after a [`Decision::Hold`] the round is over.
    pub fn offer(&mut self, need: usize) -> Decision {
        // A request larger than the whole budget still runs, alone.
        if need > self.budget && !self.alone {
            self.free = 0;
            return Decision::Hold;
        }
        self.budget = self.budget.saturating_sub(need);
        self.free = self.free.saturating_sub(1);
        self.alone = false;
        Decision::Admit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Admit, Hold};

    /// One table row: the rule, what is live, the requests offered in arrival order (KV slots
    /// each), and the decisions expected (a round ends at a hold or when the slots run out;
    /// requests after that are not offered).
    struct Case {
        name: &'static str,
        rule: Admission,
        load: Load,
        offered: &'static [usize],
        expect: &'static [Decision],
    }

    fn rule(slots: usize, tokens: usize) -> Admission {
        Admission { slots, tokens }
    }

    fn live(live: usize, reserved: usize) -> Load {
        Load {
            live,
            reserved,
            paused: false,
        }
    }

    fn run(case: &Case) -> Vec<Decision> {
        let mut round = case.rule.round(case.load);
        let mut out = Vec::new();
        for &need in case.offered {
            if round.free() == 0 {
                break;
            }
            let d = round.offer(need);
            out.push(d);
            if d == Hold {
                break;
            }
        }
        out
    }

    #[test]
    fn admission_table() {
        let cases = [
            Case {
                name: "fifo while slots last",
                rule: rule(3, usize::MAX),
                load: live(0, 0),
                offered: &[10, 10, 10, 10],
                expect: &[Admit, Admit, Admit],
            },
            Case {
                name: "live rows take slots",
                rule: rule(4, usize::MAX),
                load: live(3, 0),
                offered: &[10, 10],
                expect: &[Admit],
            },
            Case {
                name: "full batch admits nothing",
                rule: rule(2, usize::MAX),
                load: live(2, 0),
                offered: &[1],
                expect: &[],
            },
            Case {
                name: "max_batch 0 still means one row",
                rule: rule(0, usize::MAX),
                load: live(0, 0),
                offered: &[1, 1],
                expect: &[Admit],
            },
            Case {
                name: "kv budget holds the head, nothing overtakes it",
                rule: rule(8, 1000),
                load: live(1, 600),
                offered: &[300, 200, 10],
                expect: &[Admit, Hold],
            },
            Case {
                name: "larger than the whole budget runs alone when idle",
                rule: rule(8, 1000),
                load: live(0, 0),
                offered: &[5000, 10],
                expect: &[Admit, Hold],
            },
            Case {
                name: "larger than the whole budget waits while others are live",
                rule: rule(8, 1000),
                load: live(1, 10),
                offered: &[5000],
                expect: &[Hold],
            },
            Case {
                name: "requests fill the budget exactly",
                rule: rule(8, 1000),
                load: live(0, 0),
                offered: &[400, 600, 1],
                expect: &[Admit, Admit, Hold],
            },
            Case {
                name: "paused (decode backlog full) admits nothing",
                rule: rule(8, usize::MAX),
                load: Load {
                    live: 0,
                    reserved: 0,
                    paused: true,
                },
                offered: &[1],
                expect: &[],
            },
            Case {
                name: "reserved over the budget (a lone giant running) holds everyone",
                rule: rule(8, 1000),
                load: live(1, 5000),
                offered: &[1],
                expect: &[Hold],
            },
        ];
        for case in &cases {
            assert_eq!(run(case), case.expect, "{}", case.name);
        }
    }
}
