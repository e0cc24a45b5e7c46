//! Who gets the model next: the per-step token budget shared by running rows and prompts that
//! are being prefilled, and the prefill round both engines run on it ([`prefill_round`]). Pure
//! bookkeeping: the runners pass in what runs the model.
//!
//! Every engine iteration has a budget in *prompt-token units* (one unit = the multiply-adds
//! of one LLM token; a vision-tower block of one image costs several, see
//! `UnderstandingModel::vision_block_cost`). Running decode rows are served first, one unit
//! each. What is left goes to requests still being prefilled, in arrival order, except that a
//! request whose remaining work fits in what is left goes ahead of longer ones: a short prompt
//! that arrives during a long prefill gets its first token within a few steps, and a burst of
//! requests gets its first tokens one after another instead of all at the end.

/// Budget units granted to the waiting request at `index` (arrival order) for this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub index: usize,
    pub units: usize,
}

/// The token budget of one engine iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepBudget {
    /// Units per iteration (decode rows + prefill work).
    pub units: usize,
}

impl StepBudget {
    pub fn new(units: usize) -> Self {
        Self {
            units: units.max(1),
        }
    }

    /// Plans one iteration: `decode_rows` running rows take their unit first; `waiting[i]` is
    /// the work left (units) of the `i`-th waiting request in arrival order. Grants are
    /// returned in the order to run them. When decode rows take the whole budget the oldest
    /// waiting request still gets a minimal grant, so prefills always progress.
    pub fn plan(&self, decode_rows: usize, waiting: &[usize]) -> Vec<Grant> {
        let mut left = self.units.saturating_sub(decode_rows);
        let mut granted = vec![0usize; waiting.len()];
        let mut out = Vec::new();
        // Requests that finish within what is left go first (shortest work is not reordered
        // beyond that: among those that fit, arrival order).
        for (i, &need) in waiting.iter().enumerate() {
            if need > 0 && need <= left {
                granted[i] = need;
                left -= need;
                out.push(Grant {
                    index: i,
                    units: need,
                });
            }
        }
        // Then the oldest longer ones, as far as the budget goes.
        for (i, &need) in waiting.iter().enumerate() {
            if left == 0 {
                break;
            }
            if granted[i] == 0 && need > 0 {
                let units = need.min(left);
                granted[i] = units;
                left -= units;
                out.push(Grant { index: i, units });
            }
        }
        if out.is_empty() {
            if let Some(i) = waiting.iter().position(|&w| w > 0) {
                out.push(Grant { index: i, units: 1 });
            }
        }
        out
    }
}

/// Takes the waiting requests named by `done` (index into `waiting`, outcome) out of `waiting`
/// and returns them with their outcomes in arrival order; the others keep their order.
pub(crate) fn take_done<W, R>(waiting: &mut Vec<W>, mut done: Vec<(usize, R)>) -> Vec<(W, R)> {
    // Highest index first, so the remaining indices stay valid.
    done.sort_by_key(|d| std::cmp::Reverse(d.0));
    let mut out: Vec<(W, R)> = done
        .into_iter()
        .map(|(i, r)| (waiting.remove(i), r))
        .collect();
    out.reverse();
    out
}

/// The prefill bookkeeping both engines share, one engine iteration of it: waiting requests
/// whose client left or whose deadline passed (`gone`) are dropped, the step's grants are
/// planned over the work left of the others (`cost`, after `decode_rows` running rows), `run`
/// spends each grant on its request (`Some(outcome)` when its prefill finished, or failed),
/// and the finished requests leave `waiting` in arrival order.
pub(crate) fn prefill_round<W, R>(
    waiting: &mut Vec<W>,
    budget: &StepBudget,
    decode_rows: usize,
    gone: impl Fn(&W) -> bool,
    cost: impl Fn(&W) -> usize,
    mut run: impl FnMut(&mut W, usize) -> Option<R>,
) -> PrefillRound<W, R> {
    let before = waiting.len();
    waiting.retain(|w| !gone(w));
    let dropped = before - waiting.len();
    if waiting.is_empty() {
        return PrefillRound {
            dropped,
            done: Vec::new(),
        };
    }
    let costs: Vec<usize> = waiting.iter().map(cost).collect();
    let mut done = Vec::new();
    for grant in budget.plan(decode_rows, &costs) {
        if let Some(outcome) = run(&mut waiting[grant.index], grant.units) {
            done.push((grant.index, outcome));
        }
    }
    PrefillRound {
        dropped,
        done: take_done(waiting, done),
    }
}

/// What one [`prefill_round`] did.
#[derive(Debug, PartialEq)]
pub(crate) struct PrefillRound<W, R> {
    /// Waiting requests dropped because their client left or their deadline passed.
    pub dropped: usize,
    /// Requests whose prefill finished (or failed) this round, with the outcome, in arrival
    /// order.
    pub done: Vec<(W, R)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(index: usize, units: usize) -> Grant {
        Grant { index, units }
    }

    #[test]
    fn decode_rows_first_then_oldest_prefill() {
        let b = StepBudget::new(256);
        // 8 running rows leave 248 for a 16k-token prompt.
        assert_eq!(b.plan(8, &[16_000]), vec![g(0, 248)]);
        // Nothing running: the whole budget.
        assert_eq!(b.plan(0, &[16_000]), vec![g(0, 256)]);
    }

    #[test]
    fn a_short_prompt_goes_ahead_of_a_long_one() {
        let b = StepBudget::new(256);
        // The long prompt arrived first, the 10-token one after: the short one finishes in this
        // step and the long one takes the rest.
        assert_eq!(b.plan(2, &[9_000, 10]), vec![g(1, 10), g(0, 244)]);
    }

    #[test]
    fn a_burst_is_served_oldest_first() {
        let b = StepBudget::new(256);
        // Eight equal requests larger than the budget: only the oldest advances, so first tokens
        // come one after another.
        assert_eq!(b.plan(0, &[700; 8]), vec![g(0, 256)]);
        // When the oldest is nearly done, the rest of the budget goes to the next one.
        assert_eq!(b.plan(1, &[100, 700, 700]), vec![g(0, 100), g(1, 155)]);
    }

    #[test]
    fn prefill_progresses_when_decode_takes_the_budget() {
        let b = StepBudget::new(16);
        assert_eq!(b.plan(32, &[0, 50, 3]), vec![g(1, 1)]);
        assert!(b.plan(32, &[]).is_empty());
        assert!(b.plan(0, &[0, 0]).is_empty());
    }

    #[test]
    fn done_requests_leave_in_arrival_order() {
        let mut waiting = vec!['a', 'b', 'c', 'd'];
        let out = take_done(&mut waiting, vec![(3, 30), (1, 10)]);
        assert_eq!(out, vec![('b', 10), ('d', 30)]);
        assert_eq!(waiting, vec!['a', 'c']);
    }

    #[test]
    fn several_fitting_requests_share_a_step() {
        let b = StepBudget::new(100);
        assert_eq!(
            b.plan(10, &[30, 500, 40, 30]),
            vec![g(0, 30), g(2, 40), g(1, 20)]
        );
    }

    /// A waiting request of the table: its name, prompt units left, and whether its client left.
    #[derive(Debug, Clone, PartialEq)]
    struct W {
        name: char,
        left: usize,
        gone: bool,
    }

    fn w(name: char, left: usize) -> W {
        W {
            name,
            left,
            gone: false,
        }
    }

    /// One round over `waiting` with a budget of `units` after `decode_rows` running rows: the
    /// grants run (as `name:units`), the names dropped, the names done, and what stays waiting.
    fn round(
        units: usize,
        decode_rows: usize,
        mut waiting: Vec<W>,
    ) -> (Vec<String>, usize, Vec<char>, Vec<W>) {
        let mut ran = Vec::new();
        let r = prefill_round(
            &mut waiting,
            &StepBudget::new(units),
            decode_rows,
            |w| w.gone,
            |w| w.left,
            |w, units| {
                ran.push(format!("{}:{units}", w.name));
                w.left -= units.min(w.left);
                (w.left == 0).then_some(())
            },
        );
        let done = r.done.into_iter().map(|(w, ())| w.name).collect();
        (ran, r.dropped, done, waiting)
    }

    #[test]
    fn prefill_round_table() {
        // (budget, decode rows, waiting) → (grants run, dropped, done in arrival order, left)
        let gone = W {
            gone: true,
            ..w('x', 50)
        };
        let cases = [
            (
                "one long prompt takes what decode leaves",
                (100, 10, vec![w('a', 500)]),
                (vec!["a:90"], 0, vec![], vec![w('a', 410)]),
            ),
            (
                "a short prompt finishes ahead of a long one and leaves first",
                (100, 0, vec![w('a', 500), w('b', 30)]),
                (vec!["b:30", "a:70"], 0, vec!['b'], vec![w('a', 430)]),
            ),
            (
                "several requests finish in one round, in arrival order",
                (100, 0, vec![w('a', 60), w('b', 10), w('c', 30)]),
                (vec!["a:60", "b:10", "c:30"], 0, vec!['a', 'b', 'c'], vec![]),
            ),
            (
                "a client that left is dropped before planning",
                (100, 0, vec![gone.clone(), w('b', 20)]),
                (vec!["b:20"], 1, vec!['b'], vec![]),
            ),
            (
                "only gone requests: nothing runs",
                (100, 0, vec![gone.clone(), gone]),
                (vec![], 2, vec![], vec![]),
            ),
            (
                "decode takes the budget: the oldest still gets a unit",
                (8, 16, vec![w('a', 5), w('b', 5)]),
                (vec!["a:1"], 0, vec![], vec![w('a', 4), w('b', 5)]),
            ),
        ];
        for (name, (units, rows, waiting), (ran, dropped, done, left)) in cases {
            let got = round(units, rows, waiting);
            let ran: Vec<String> = ran.into_iter().map(String::from).collect();
            assert_eq!(got, (ran, dropped, done, left), "{name}");
        }
    }
}
