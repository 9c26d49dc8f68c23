//! Call takeover planning (DESIGN §5), sans-IO: which live node takes each
//! call of a node that stopped making progress.
//!
//! The Raft leader watches its peers (a voter it has not heard from for
//! `takeover_after` is dead) and proposes one entry of
//! [`Command::Reassign`] for every call the dead node owns. Ownership moves
//! only when that entry commits, and only from the owner the plan saw
//! ([`crate::state::State::apply_at`] fences stale plans and stale writers).
//!
//! Spreading: calls go one by one to the live switch that owns the fewest
//! calls at that point (ties by name), so a zone's calls end spread evenly
//! over the other zone's nodes.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::{Command, State};

/// The reassignments that move every call owned by a node in `dead` to the
/// least loaded of `live` (no command when `live` is empty).
pub fn plan(state: &State, dead: &BTreeSet<String>, live: &BTreeSet<String>) -> Vec<Command> {
    if live.is_empty() {
        return vec![];
    }
    let mut load: BTreeMap<&str, usize> = live.iter().map(|n| (n.as_str(), 0)).collect();
    for c in state.calls() {
        if let Some(n) = load.get_mut(c.owner.as_str()) {
            *n += 1;
        }
    }
    let mut out = vec![];
    for c in state.calls().filter(|c| dead.contains(&c.owner)) {
        // BTreeMap order makes ties go to the first name.
        let Some((to, n)) = load.iter_mut().min_by_key(|(_, n)| **n) else {
            break;
        };
        *n += 1;
        out.push(Command::Reassign {
            call_id: c.call_id.clone(),
            from: c.owner.clone(),
            to: (*to).to_string(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{CallRecord, Entry, ProposalId};

    fn state_with(owners: &[(&str, &str)]) -> State {
        let mut s = State::new();
        let cmds = owners
            .iter()
            .map(|(id, owner)| {
                let mut c: CallRecord = crate::state::test_call(id);
                c.owner = (*owner).into();
                Command::PutCall { call: Box::new(c) }
            })
            .collect();
        s.apply(&Entry {
            id: ProposalId(1),
            at_unix: 1,
            cmds,
        });
        s
    }

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn moves(cmds: &[Command]) -> Vec<(String, String)> {
        cmds.iter()
            .map(|c| match c {
                Command::Reassign { call_id, to, .. } => (call_id.clone(), to.clone()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_dead_zones_calls_spread_evenly_over_the_live_nodes() {
        let s = state_with(&[
            ("c1", "a1"),
            ("c2", "a1"),
            ("c3", "a2"),
            ("c4", "a2"),
            ("c5", "b1"),
        ]);
        let cmds = plan(&s, &names(&["a1", "a2"]), &names(&["b1", "b2"]));
        // b2 starts empty, b1 with one call: b2, b2?, ... by least load.
        assert_eq!(
            moves(&cmds),
            vec![
                ("c1".into(), "b2".into()),
                ("c2".into(), "b1".into()),
                ("c3".into(), "b2".into()),
                ("c4".into(), "b1".into()),
            ]
        );
        let mut after = s.clone();
        after.apply(&Entry {
            id: ProposalId(2),
            at_unix: 2,
            cmds,
        });
        let count = |n: &str| after.calls().filter(|c| c.owner == n).count();
        assert_eq!((count("b1"), count("b2"), count("a1")), (3, 2, 0));
        // Nothing left to move; no live node: no plan.
        assert!(plan(&after, &names(&["a1", "a2"]), &names(&["b1", "b2"])).is_empty());
        assert!(plan(&s, &names(&["a1"]), &names(&[])).is_empty());
    }
}
