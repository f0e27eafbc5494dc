//! The vault rules, scenario by scenario and as properties over random
//! histories.

mod sim;

use coffre_vault::*;
use proptest::prelude::*;
use sim::*;

#[test]
fn first_opens_last_closes() {
    let mut s = Sim::new(members(2, 1));
    let a = s.enter("m0");
    assert_eq!(s.vault.phase(), Phase::Open);
    assert!(s.key_held);
    let b = s.enter("m1");
    assert_eq!(
        s.session_cmd("m0", Command::Leave { session: a }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.phase(), Phase::Open);
    // m0 cannot end m1's session.
    assert_eq!(
        refused(&s.session_cmd("m0", Command::Leave { session: b })),
        Some(Refusal::NoSession)
    );
    s.session_cmd("m1", Command::Leave { session: b });
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
}

#[test]
fn a_mode_switch_takes_effect_at_the_next_close() {
    let mut s = Sim::new(members(1, 1));
    let su = "su0";
    assert_eq!(
        (s.vault.status().mode, s.vault.status().mode_pending),
        (Mode::Fast, None)
    );
    // While closed: pending until a close happens.
    assert_eq!(
        s.run(su, Command::SetMode { mode: Mode::Safe }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.status().mode, Mode::Fast);
    assert_eq!(s.vault.status().mode_pending, Some(Mode::Safe));
    let a = s.enter(su);
    assert_eq!(s.vault.status().mode, Mode::Fast, "an open changes nothing");
    s.session_cmd(su, Command::Leave { session: a });
    assert_eq!(s.close_modes, vec![Mode::Safe]);
    assert_eq!(
        (s.vault.status().mode, s.vault.status().mode_pending),
        (Mode::Safe, None)
    );
    // While open: this very close uses it.
    let a = s.enter(su);
    s.run(su, Command::SetMode { mode: Mode::Fast });
    assert_eq!(s.vault.status().mode_pending, Some(Mode::Fast));
    s.session_cmd(su, Command::Leave { session: a });
    assert_eq!(s.close_modes, vec![Mode::Safe, Mode::Fast]);
    // It survives a restart.
    let p = s.vault.persistent().clone();
    let s2 = Sim::new(p);
    assert_eq!(
        (s2.vault.status().mode, s2.vault.status().mode_pending),
        (Mode::Fast, None)
    );
}

#[test]
fn a_task_bound_to_a_workload_keeps_the_vault_open_until_it_ends() {
    let mut s = Sim::new(members(1, 0));
    let a = s.enter("m0");
    let add = |s: &mut Sim, workload: &str| {
        s.session_cmd(
            "m0",
            Command::TaskAdd {
                session: a,
                name: "build".into(),
                claimed_owner: None,
                duration_ms: 3_600_000,
                workload: Some(workload.into()),
            },
        )
    };
    assert!(matches!(
        add(&mut s, "build"),
        Outcome::Ok(Reply::TaskAdded { .. })
    ));
    assert!(matches!(
        add(&mut s, "other"),
        Outcome::Ok(Reply::TaskAdded { .. })
    ));
    s.session_cmd("m0", Command::Leave { session: a });
    assert_eq!(s.vault.phase(), Phase::Open, "the tasks keep it open");
    s.handle(Event::WorkloadEnded {
        name: "build".into(),
    });
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Open, "another task still runs");
    s.handle(Event::WorkloadEnded {
        name: "other".into(),
    });
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
}

#[test]
fn every_member_proves_their_keyslot() {
    let mut s = Sim::new(members(2, 0));
    s.enter("m0");
    let t = s.fresh();
    let req = s.request("m1", Command::Enter, false, t);
    s.settle();
    assert_eq!(refused(&s.replies[&req]), Some(Refusal::WrongPassword));
    assert_eq!(s.vault.sessions().count(), 1);
}

/// The organisation's directory (issue 16): the shell asks it around the
/// keyslot check and reports a refusal instead of the check's result.
fn enter_refused_by_the_source(s: &mut Sim, member: &str, unreachable: bool) -> Outcome {
    let t = s.fresh();
    let req = s.request(member, Command::Enter, true, t);
    // The sim checked the keyslot at once; the shell would have asked the
    // directory: its refusal replaces the check's result.
    let checked = s.inbox.pop_back().expect("a password check");
    assert!(matches!(checked, Event::PasswordChecked { req: r, ok: true } if r == req));
    s.handle(Event::SourceRefused {
        req,
        unreachable,
        detail: "the account is not in members_group".into(),
    });
    s.settle();
    s.replies.remove(&req).expect("a reply")
}

#[test]
fn the_organisations_directory_refuses_like_a_wrong_password_and_unreachable_is_busy() {
    let mut s = Sim::new(members(2, 0));
    // A refusal reads as a wrong password, is audited with the detail,
    // wipes the key the enter kept, and counts as a failed attempt.
    let o = enter_refused_by_the_source(&mut s, "m0", false);
    assert_eq!(refused(&o), Some(Refusal::WrongPassword));
    let Outcome::Refused { message, .. } = &o else {
        unreachable!()
    };
    assert_eq!(
        message, "wrong password",
        "one message whichever check refused"
    );
    assert!(s.audit.iter().any(|a| a.actor == "m0"
        && a.result == "refused:wrong_password"
        && a.detail.contains("not in members_group")));
    s.check_open_rule();
    assert_eq!(s.vault.phase(), Phase::Closed);
    let t = s.fresh();
    let req = s.request("m0", Command::Enter, true, t);
    s.settle();
    assert_eq!(refused(&s.replies[&req]), Some(Refusal::Throttled));
    // (m1 comes from the same address: past the throttle first.)
    s.advance(600_000);
    // Unreachable: busy, with a message that says so, and not counted.
    let o = enter_refused_by_the_source(&mut s, "m1", true);
    assert_eq!(refused(&o), Some(Refusal::Busy));
    let Outcome::Refused { message, .. } = &o else {
        unreachable!()
    };
    assert!(message.contains("cannot be reached"), "{message}");
    s.check_open_rule();
    s.enter("m1");
    assert_eq!(s.vault.phase(), Phase::Open);
}

#[test]
fn a_disqualified_member_is_thrown_out_and_the_last_one_out_closes() {
    let mut s = Sim::new(members(2, 0));
    let a = s.enter("m0");
    s.enter("m1");
    assert!(matches!(
        s.session_cmd(
            "m0",
            Command::TaskAdd {
                session: a,
                name: "build".into(),
                claimed_owner: None,
                duration_ms: 3_600_000,
                workload: None,
            },
        ),
        Outcome::Ok(Reply::TaskAdded { .. })
    ));
    s.handle(Event::Disqualified {
        member: "m0".into(),
        reason: "the directory's account is locked".into(),
    });
    s.settle();
    assert!(s.vault.sessions().all(|x| x.member == "m1"));
    assert!(s.vault.status().tasks.is_empty(), "m0's task cancelled");
    assert!(s.dropped.contains(&a), "m0's transport told");
    assert_eq!(s.vault.phase(), Phase::Open, "m1 is still inside");
    assert!(s.audit.iter().any(|r| r.action == "member_disqualified"
        && r.detail.contains("m0")
        && r.detail.contains("locked")));
    s.handle(Event::Disqualified {
        member: "m1".into(),
        reason: "the directory cannot be reached since 3600 s".into(),
    });
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Closed);
    s.check_open_rule();
    // Still members: the keyslots are untouched.
    assert_eq!(s.vault.members().len(), 2);
    assert!(s.removed.is_empty());
}

#[test]
fn a_disqualified_superusers_approvals_no_longer_count() {
    let mut p = members(0, 3);
    p.policy.unlock_quorum = 2;
    let mut s = Sim::new(p);
    s.run(
        "su0",
        Command::Lock {
            reason: "drill".into(),
        },
    );
    assert_eq!(
        s.run("su1", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 1 })
    );
    // Out of superusers_group (still a member): the approval goes, and it
    // is audited.
    assert!(s.vault.has_approvals("su1"));
    s.handle(Event::ApprovalsWithdrawn {
        member: "su1".into(),
        reason: "not in superusers_group".into(),
    });
    assert!(s.vault.status().unlock_approvals.is_empty());
    assert!(!s.vault.has_approvals("su1"));
    assert!(
        s.audit
            .iter()
            .any(|r| r.action == "approvals_withdrawn" && r.detail.contains("su1"))
    );
    assert_eq!(
        s.run("su2", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 1 })
    );
    assert!(s.vault.is_locked());
}

#[test]
fn task_keeps_open_until_expiry_and_owner_is_authenticated() {
    let mut s = Sim::new(members(2, 0));
    let a = s.enter("m0");
    let o = s.session_cmd(
        "m0",
        Command::TaskAdd {
            session: a,
            name: "backup".into(),
            claimed_owner: Some("m1".into()),
            duration_ms: 60_000,
            workload: None,
        },
    );
    assert_eq!(refused(&o), Some(Refusal::NotPermitted));
    let o = s.session_cmd(
        "m0",
        Command::TaskAdd {
            session: a,
            name: "backup".into(),
            claimed_owner: Some("m0".into()),
            duration_ms: 60_000,
            workload: None,
        },
    );
    assert!(matches!(o, Outcome::Ok(Reply::TaskAdded { .. })));
    let too_long = s.session_cmd(
        "m0",
        Command::TaskAdd {
            session: a,
            name: "x".into(),
            claimed_owner: None,
            duration_ms: u64::MAX,
            workload: None,
        },
    );
    assert_eq!(refused(&too_long), Some(Refusal::Invalid));
    s.session_cmd("m0", Command::Leave { session: a });
    assert_eq!(s.vault.phase(), Phase::Open, "the task keeps it open");
    s.advance(10_000);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Open);
    s.advance(51_000);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(s.audit.iter().any(|r| r.action == "task_expire"));
}

#[test]
fn vanished_client_is_dropped_after_grace() {
    let mut p = members(1, 0);
    p.policy.grace_ms = 5_000;
    let mut s = Sim::new(p);
    let a = s.enter("m0");
    s.advance(4_000);
    s.session_cmd("m0", Command::Heartbeat { session: a });
    s.advance(4_000);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Open);
    s.advance(2_000);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert_eq!(s.dropped, vec![a]);
}

#[test]
fn lock_drops_everyone_and_refuses_right_passwords() {
    let mut s = Sim::new(members(1, 1));
    s.enter("m0");
    let su = s.enter("su0");
    let sess = s.vault.sessions().count();
    assert_eq!(sess, 2);
    let o = s.run(
        "su0",
        Command::Lock {
            reason: "laptop stolen".into(),
        },
    );
    assert_eq!(o, Outcome::Ok(Reply::Done));
    assert_eq!(s.vault.status().state, "locked");
    assert!(!s.key_held);
    assert_eq!(s.dropped.len(), 2);
    let t = s.fresh();
    let req = s.request("m0", Command::Enter, true, t);
    // Refused before any key derivation: no check is pending.
    assert_eq!(s.vault.pending_checks(), 0);
    s.settle();
    assert_eq!(refused(&s.replies[&req]), Some(Refusal::Locked));
    assert_eq!(
        refused(&s.run("su0", Command::Enter)),
        Some(Refusal::Locked)
    );
    let _ = su;
    assert_eq!(
        s.run("su0", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 0 })
    );
    assert_eq!(s.vault.status().state, "closed");
    s.enter("m0");
    assert_eq!(s.vault.phase(), Phase::Open);
}

#[test]
fn lock_wipes_the_key_even_when_closing_fails() {
    let mut s = Sim::new(members(1, 1));
    s.enter("m0");
    s.close_fails = true;
    s.run(
        "su0",
        Command::Lock {
            reason: "now".into(),
        },
    );
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
    assert!(
        s.audit.iter().any(|r| r.action == "state"
            && r.result == "locked"
            && r.detail.contains("not flushed"))
    );
}

#[test]
fn failed_close_is_retried_and_not_reported_closed() {
    let mut s = Sim::new(members(1, 0));
    let a = s.enter("m0");
    s.close_fails = true;
    s.session_cmd("m0", Command::Leave { session: a });
    assert_eq!(s.vault.phase(), Phase::Closing);
    assert!(s.key_held);
    s.advance(1_000);
    assert_eq!(s.vault.phase(), Phase::Closing);
    s.close_fails = false;
    s.advance(2_000);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
}

#[test]
fn a_close_that_keeps_failing_is_forced_in_the_end() {
    let mut s = Sim::new(members(1, 0));
    let a = s.enter("m0");
    s.close_fails = true;
    s.session_cmd("m0", Command::Leave { session: a });
    let limit = s.vault.persistent().policy.close_force_after_ms;
    let mut waited = 0;
    while s.vault.phase() == Phase::Closing && waited <= limit + 10_000 {
        assert!(s.key_held, "the key stays while the close is retried");
        s.advance(2_000);
        s.settle();
        waited += 2_000;
    }
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
    assert!(
        waited >= limit,
        "forced only after {limit} ms, not {waited}"
    );
    assert!(
        s.audit
            .iter()
            .any(|r| r.action == "state" && r.result == "close_forced")
    );
}

/// A close that hangs (storage that stopped answering) never reports a
/// failure: it is forced all the same once it has run for as long as a
/// failing one is forced after, so the key goes with nobody inside.
#[test]
fn a_close_that_hangs_is_forced_in_the_end() {
    let mut s = Sim::new(members(1, 0));
    let a = s.enter("m0");
    s.close_hangs = true;
    s.session_cmd("m0", Command::Leave { session: a });
    let limit = s.vault.persistent().policy.close_force_after_ms;
    let mut waited = 0;
    while s.vault.phase() == Phase::Closing && waited <= limit + 10_000 {
        assert!(s.key_held, "the key stays while the close runs");
        s.advance(2_000);
        s.settle();
        waited += 2_000;
    }
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
    assert!(waited >= limit, "forced after {waited} ms, before {limit}");
    assert!(
        s.audit
            .iter()
            .any(|r| r.action == "state" && r.result == "close_forced")
    );
}

/// An open that takes longer than the heartbeat grace (large VMs resumed)
/// keeps whoever entered: they learn their session only when it ends, so
/// they could not send heartbeats. Before, their session was dropped and
/// the vault closed as soon as it opened.
#[test]
fn an_open_longer_than_the_grace_keeps_who_entered() {
    let mut s = Sim::new(members(1, 0));
    s.hold_opens = true;
    let t = s.fresh();
    let req = s.request("m0", Command::Enter, true, t);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Opening);
    let grace = s.vault.persistent().policy.grace_ms;
    s.advance(grace + 5_000);
    s.advance(2_000);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Opening);
    s.handle(Event::Opened {
        ok: true,
        detail: String::new(),
    });
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Open);
    assert!(s.vault.has_presence(), "the session went while it opened");
    assert!(matches!(
        s.replies.get(&req),
        Some(Outcome::Ok(Reply::Entered { .. }))
    ));
    // And it lasts the grace from then on, as any session.
    s.advance(grace / 2);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Open);
}

/// A close that runs long but moves data (large VMs suspended into the
/// volume) is slow, not hung: it is not forced while it moves data, and
/// is once it stops.
#[test]
fn a_slow_close_that_moves_data_is_not_forced() {
    let mut s = Sim::new(members(1, 0));
    let a = s.enter("m0");
    s.close_hangs = true;
    s.session_cmd("m0", Command::Leave { session: a });
    let limit = s.vault.persistent().policy.close_force_after_ms;
    for _ in 0..(limit * 3 / 2_000) {
        s.handle(Event::CloseProgress);
        s.advance(2_000);
        s.settle();
        assert_eq!(s.vault.phase(), Phase::Closing, "forced while moving data");
        assert!(s.key_held);
    }
    let mut waited = 0;
    while s.vault.phase() == Phase::Closing && waited <= limit + 10_000 {
        s.advance(2_000);
        s.settle();
        waited += 2_000;
    }
    assert_eq!(s.vault.phase(), Phase::Closed);
    // The last progress came 2 s before the wait began.
    assert!(
        waited + 2_000 >= limit,
        "forced {waited} ms after the last progress"
    );
    assert!(!s.key_held);
    assert!(
        s.audit
            .iter()
            .any(|r| r.action == "state" && r.result == "close_forced")
    );
}

#[test]
fn two_person_unlock_within_window() {
    let mut p = members(0, 3);
    p.policy.unlock_quorum = 2;
    p.policy.approval_window_ms = 60_000;
    let mut s = Sim::new(p);
    s.run(
        "su0",
        Command::Lock {
            reason: "drill".into(),
        },
    );
    assert_eq!(
        s.run("su1", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 1 })
    );
    // The same superuser twice does not count twice.
    assert_eq!(
        s.run("su1", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 1 })
    );
    s.advance(61_000);
    assert_eq!(
        s.run("su2", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 1 }),
        "su1's approval expired"
    );
    assert_eq!(
        s.run("su0", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 0 })
    );
    assert!(!s.vault.is_locked());
}

#[test]
fn quorum_never_exceeds_superusers() {
    let mut s = Sim::new(members(1, 2));
    assert_eq!(
        refused(&s.run("su0", Command::SetQuorum { quorum: 3 })),
        Some(Refusal::Invalid)
    );
    assert_eq!(
        s.run("su0", Command::SetQuorum { quorum: 2 }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(
        refused(&s.run("su0", Command::MemberRemove { name: "su1".into() })),
        Some(Refusal::Invalid)
    );
    assert_eq!(
        refused(&s.run("m0", Command::SetQuorum { quorum: 1 })),
        Some(Refusal::NotPermitted)
    );
    // Lowering it takes the quorum in force: a proposal, then su1's
    // approval.
    let Outcome::Ok(Reply::Proposal {
        id, remaining: 1, ..
    }) = s.run("su0", Command::SetQuorum { quorum: 1 })
    else {
        panic!("a proposal")
    };
    assert_eq!(
        s.run("su1", Command::Approve { id }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(
        s.run("su0", Command::MemberRemove { name: "su1".into() }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.removed, vec!["su1".to_string()]);
}

fn proposal(o: Outcome) -> (String, u32) {
    match o {
        Outcome::Ok(Reply::Proposal { id, remaining, .. }) => (id, remaining),
        other => panic!("expected a proposal, got {other:?}"),
    }
}

/// The quorum protects itself: with quorum 2 one superuser's `quorum`,
/// `invite --role superuser` or removal of a superuser is only a proposal,
/// carried out when a second superuser approves it by id.
#[test]
fn quorum_changes_promotions_and_superuser_removals_need_the_quorum() {
    let mut p = members(1, 3);
    p.policy.unlock_quorum = 2;
    let mut s = Sim::new(p);
    let (id, remaining) = proposal(s.run("su0", Command::SetQuorum { quorum: 1 }));
    assert_eq!(remaining, 1);
    assert_eq!(s.vault.persistent().policy.unlock_quorum, 2);
    assert_eq!(s.vault.status().proposals.len(), 1);
    assert_eq!(s.vault.status().proposals[0].id, id);
    // The author again counts once; a plain member cannot approve.
    assert_eq!(
        proposal(s.run("su0", Command::Approve { id: id.clone() })),
        (id.clone(), 1)
    );
    assert_eq!(
        refused(&s.run("m0", Command::Approve { id: id.clone() })),
        Some(Refusal::NotPermitted)
    );
    assert_eq!(s.vault.persistent().policy.unlock_quorum, 2);
    assert_eq!(
        s.run("su1", Command::Approve { id: id.clone() }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.persistent().policy.unlock_quorum, 1);
    assert!(s.vault.status().proposals.is_empty());
    assert!(s.audit.iter().any(|a| a.action == "proposal"
        && a.result == "approved"
        && a.detail.contains("su0, su1")));
    // Done once: the id is spent.
    assert_eq!(
        refused(&s.run("su2", Command::Approve { id })),
        Some(Refusal::Invalid)
    );
    // Back to 2 (quorum 1: at once), then a removal and a promotion.
    assert_eq!(
        s.run("su0", Command::SetQuorum { quorum: 2 }),
        Outcome::Ok(Reply::Done)
    );
    let (rm, _) = proposal(s.run("su0", Command::MemberRemove { name: "su2".into() }));
    assert!(s.vault.members().contains_key("su2"));
    let (inv, _) = proposal(s.run(
        "su0",
        Command::Invite {
            name: "eve".into(),
            role: Role::Superuser,
        },
    ));
    assert_eq!(s.vault.status().proposals.len(), 2, "one per kind");
    // A plain member's invitation is no promotion: at once.
    assert_eq!(
        s.run(
            "su0",
            Command::Invite {
                name: "frank".into(),
                role: Role::Member,
            }
        ),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(
        s.run("su1", Command::Approve { id: rm }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.removed, vec!["su2".to_string()]);
    // The approval that reaches the quorum makes the invitation with its
    // own key (the sim checks a key was kept for it).
    assert_eq!(
        s.run("su1", Command::Approve { id: inv }),
        Outcome::Ok(Reply::Done)
    );
    assert!(s.kept.is_empty());
    assert!(
        s.audit
            .iter()
            .any(|a| a.action == "member_invite" && a.detail.contains("eve as superuser"))
    );
}

#[test]
fn proposals_are_superseded_expire_and_die_with_a_lock() {
    let mut p = members(0, 3);
    p.policy.unlock_quorum = 2;
    p.policy.approval_window_ms = 60_000;
    let mut s = Sim::new(p);
    let (first, _) = proposal(s.run("su0", Command::SetQuorum { quorum: 3 }));
    let (second, _) = proposal(s.run("su1", Command::SetQuorum { quorum: 1 }));
    assert_ne!(first, second);
    assert!(
        s.audit
            .iter()
            .any(|a| a.result == "superseded" && a.detail.contains(&first))
    );
    assert_eq!(
        refused(&s.run("su2", Command::Approve { id: first })),
        Some(Refusal::Invalid)
    );
    s.advance(61_000);
    assert!(
        s.audit
            .iter()
            .any(|a| a.result == "expired" && a.detail.contains(&second))
    );
    assert_eq!(
        refused(&s.run("su2", Command::Approve { id: second })),
        Some(Refusal::Invalid)
    );
    // An approval after the window finds it expired, tick or not.
    let (late, _) = proposal(s.run("su0", Command::SetQuorum { quorum: 3 }));
    s.now = s.now.plus(60_000);
    assert_eq!(
        refused(&s.run("su1", Command::Approve { id: late.clone() })),
        Some(Refusal::Invalid)
    );
    assert!(
        s.audit
            .iter()
            .any(|a| a.result == "expired" && a.detail.contains(&late))
    );
    assert_eq!(s.vault.persistent().policy.unlock_quorum, 2);
    let (third, _) = proposal(s.run("su0", Command::SetQuorum { quorum: 3 }));
    s.run("su0", Command::Lock { reason: "x".into() });
    assert!(
        s.audit
            .iter()
            .any(|a| a.result == "cancelled" && a.detail.contains(&third))
    );
    assert_eq!(
        refused(&s.run("su1", Command::Approve { id: third.clone() })),
        Some(Refusal::Locked)
    );
    s.run("su0", Command::Unlock);
    s.run("su1", Command::Unlock);
    assert!(!s.vault.is_locked());
    assert_eq!(
        refused(&s.run("su1", Command::Approve { id: third })),
        Some(Refusal::Invalid)
    );
    assert_eq!(s.vault.persistent().policy.unlock_quorum, 2);
}

/// With quorum 1 a lone admin's commands take effect at once.
/// A member becomes a superuser and back without leaving (their keyslot
/// and numbers stay): a superuser's command, with password and TOTP, at
/// once under a quorum of 1; never the last superuser, never below the
/// quorum, never while locked; each change audited.
#[test]
fn roles_change_in_place_within_the_quorums_rules() {
    let mut s = Sim::new(members(2, 1));
    let role = |name: &str, role| Command::SetRole {
        name: name.into(),
        role,
    };
    // A plain member cannot promote anyone, themselves included.
    assert_eq!(
        refused(&s.run("m0", role("m0", Role::Superuser))),
        Some(Refusal::NotPermitted)
    );
    assert_eq!(
        refused(&s.run("su0", role("nobody", Role::Superuser))),
        Some(Refusal::Invalid)
    );
    assert_eq!(
        refused(&s.run("su0", role("m1", Role::Member))),
        Some(Refusal::Invalid),
        "m1 is no superuser"
    );
    assert_eq!(
        refused(&s.run("su0", role("su0", Role::Superuser))),
        Some(Refusal::Invalid)
    );
    // The last superuser stays one.
    assert_eq!(
        refused(&s.run("su0", role("su0", Role::Member))),
        Some(Refusal::Invalid)
    );
    let keyslot = s.vault.members()["m0"].keyslot;
    assert_eq!(
        s.run("su0", role("m0", Role::Superuser)),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.members()["m0"].role, Role::Superuser);
    assert_eq!(s.vault.members()["m0"].keyslot, keyslot);
    assert!(s.removed.is_empty());
    assert!(
        s.audit
            .iter()
            .any(|a| a.action == "member_role" && a.result == "ok" && a.detail == "m0: superuser")
    );
    // The new superuser acts as one: they make the first one a member.
    assert_eq!(
        s.run("m0", role("su0", Role::Member)),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.members()["su0"].role, Role::Member);
    assert_eq!(
        refused(&s.run("su0", Command::Lock { reason: "x".into() })),
        Some(Refusal::NotPermitted),
        "a former superuser locks no more"
    );
    // Locked: no role changes, either way.
    assert!(matches!(
        s.run(
            "m0",
            Command::Lock {
                reason: "drill".into()
            }
        ),
        Outcome::Ok(Reply::Done)
    ));
    let t = s.fresh();
    let req = s.request("m0", role("m1", Role::Superuser), true, t);
    assert_eq!(
        s.vault.pending_checks(),
        0,
        "refused before any key derivation"
    );
    s.settle();
    assert_eq!(refused(&s.replies[&req]), Some(Refusal::Locked));
    assert_eq!(s.vault.members()["m1"].role, Role::Member);
}

/// Under a quorum above 1, a promotion and a demotion are proposals the
/// quorum approves; a superuser made a member loses the approvals they
/// gave, and the quorum never outnumbers the superusers left.
#[test]
fn promotions_and_demotions_need_the_quorum() {
    let mut p = members(1, 4);
    p.policy.unlock_quorum = 3;
    let mut s = Sim::new(p);
    let role = |name: &str, role| Command::SetRole {
        name: name.into(),
        role,
    };
    let (promote, remaining) = proposal(s.run("su0", role("m0", Role::Superuser)));
    assert_eq!(remaining, 2);
    assert_eq!(s.vault.members()["m0"].role, Role::Member);
    assert_eq!(
        s.vault.status().proposals[0].description,
        "make member m0 a superuser"
    );
    assert_eq!(
        proposal(s.run(
            "su3",
            Command::Approve {
                id: promote.clone()
            }
        )),
        (promote.clone(), 1)
    );
    // su3 is made a member by the quorum (one proposal per kind: the
    // promotion waits beside it).
    let (demote, _) = proposal(s.run("su0", role("su3", Role::Member)));
    assert_eq!(s.vault.status().proposals.len(), 2);
    proposal(s.run("su1", Command::Approve { id: demote.clone() }));
    assert_eq!(s.vault.members()["su3"].role, Role::Superuser);
    assert_eq!(
        s.run("su2", Command::Approve { id: demote }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.members()["su3"].role, Role::Member);
    assert!(
        s.audit
            .iter()
            .any(|a| a.action == "approvals_withdrawn" && a.detail.contains("su3"))
    );
    // su3's approval of the promotion no longer counts; nor can they give
    // another.
    assert_eq!(
        refused(&s.run(
            "su3",
            Command::Approve {
                id: promote.clone()
            }
        )),
        Some(Refusal::NotPermitted)
    );
    assert_eq!(
        proposal(s.run(
            "su1",
            Command::Approve {
                id: promote.clone()
            }
        )),
        (promote.clone(), 1)
    );
    assert_eq!(s.vault.members()["m0"].role, Role::Member);
    assert_eq!(
        s.run("su2", Command::Approve { id: promote }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.members()["m0"].role, Role::Superuser);
    assert!(s.audit.iter().any(|a| a.action == "proposal"
        && a.result == "approved"
        && a.detail.contains("make member m0 a superuser")));
    // Four superusers (su0, su1, su2, m0), quorum 3: one may become a
    // member, not two.
    let (id, _) = proposal(s.run("su0", role("su1", Role::Member)));
    proposal(s.run("su2", Command::Approve { id: id.clone() }));
    assert_eq!(
        s.run("m0", Command::Approve { id }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(
        refused(&s.run("su0", role("su2", Role::Member))),
        Some(Refusal::Invalid)
    );
}

/// A superuser's command waiting for its password check when its author
/// is made a member ends refused: it cannot, say, make them a superuser
/// again.
#[test]
fn a_command_checked_after_its_author_was_demoted_is_refused() {
    let mut s = Sim::new(members(0, 2));
    let t = s.fresh();
    let req = s.request(
        "su1",
        Command::SetRole {
            name: "su1".into(),
            role: Role::Superuser,
        },
        true,
        t,
    );
    // (Refused at once for now: su1 is a superuser already; what matters
    // is the next one, sent as a lock.)
    s.settle();
    assert_eq!(refused(&s.replies[&req]), Some(Refusal::Invalid));
    let t = s.fresh();
    let lock = s.request("su1", Command::Lock { reason: "x".into() }, true, t);
    assert_eq!(
        s.vault.pending_checks(),
        1,
        "su1's lock waits for its check"
    );
    let t = s.fresh();
    let demote = s.request(
        "su0",
        Command::SetRole {
            name: "su1".into(),
            role: Role::Member,
        },
        true,
        t,
    );
    // su0's check ends first.
    let at = s
        .inbox
        .iter()
        .position(|e| matches!(e, Event::PasswordChecked { req, .. } if *req == demote))
        .expect("su0's check");
    let e = s.inbox.remove(at).unwrap();
    s.handle(e);
    assert_eq!(s.replies[&demote], Outcome::Ok(Reply::Done));
    s.settle();
    assert_eq!(refused(&s.replies[&lock]), Some(Refusal::NotPermitted));
    assert!(!s.vault.is_locked());
}

/// A proposal about a member dies with their removal: it never carries
/// over to a newcomer given the same name.
#[test]
fn a_promotion_dies_with_its_member() {
    let mut p = members(1, 3);
    p.policy.unlock_quorum = 3;
    let mut s = Sim::new(p);
    let (id, _) = proposal(s.run(
        "su0",
        Command::SetRole {
            name: "m0".into(),
            role: Role::Superuser,
        },
    ));
    proposal(s.run("su1", Command::Approve { id: id.clone() }));
    assert_eq!(
        s.run("su0", Command::MemberRemove { name: "m0".into() }),
        Outcome::Ok(Reply::Done)
    );
    assert!(s.vault.status().proposals.is_empty());
    assert!(s.audit.iter().any(|a| a.action == "proposal"
        && a.result == "cancelled"
        && a.detail.contains("m0 was removed")));
    // A new m0 joins: su2's approval finds no proposal.
    s.handle(Event::MemberJoined {
        member: Member {
            name: "m0".into(),
            role: Role::Member,
            keyslot: 9,
            last_totp_step: None,
        },
    });
    assert_eq!(
        refused(&s.run("su2", Command::Approve { id })),
        Some(Refusal::Invalid)
    );
    assert_eq!(s.vault.members()["m0"].role, Role::Member);
}

/// A proposal checked when made is checked again when carried out.
#[test]
fn a_demotion_approved_after_the_superusers_changed_is_refused() {
    let mut p = members(0, 3);
    p.policy.unlock_quorum = 2;
    let mut s = Sim::new(p);
    let demote = |name: &str| Command::SetRole {
        name: name.into(),
        role: Role::Member,
    };
    let (id, _) = proposal(s.run("su0", demote("su2")));
    // Meanwhile su1 leaves the team: two superusers left, quorum 2.
    let (rm, _) = proposal(s.run("su0", Command::MemberRemove { name: "su1".into() }));
    assert_eq!(
        s.run("su2", Command::Approve { id: rm }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(
        refused(&s.run("su2", Command::Approve { id })),
        Some(Refusal::Invalid)
    );
    assert_eq!(s.vault.members()["su2"].role, Role::Superuser);
}

#[test]
fn a_lone_admin_needs_no_proposal() {
    let mut s = Sim::new(members(0, 1));
    assert_eq!(
        s.run(
            "su0",
            Command::Invite {
                name: "bob".into(),
                role: Role::Superuser,
            }
        ),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(
        s.run("su0", Command::SetQuorum { quorum: 1 }),
        Outcome::Ok(Reply::Done)
    );
    assert!(s.vault.status().proposals.is_empty());
}

#[test]
fn removed_member_is_dropped_and_refused() {
    let mut s = Sim::new(members(1, 1));
    s.enter("m0");
    s.run("su0", Command::MemberRemove { name: "m0".into() });
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert_eq!(
        refused(&s.run("m0", Command::Enter)),
        Some(Refusal::UnknownMember)
    );
}

#[test]
fn totp_step_never_accepted_twice() {
    let mut s = Sim::new(members(1, 0));
    let t = s.fresh();
    let r1 = s.request("m0", Command::Enter, true, t);
    s.settle();
    assert!(matches!(s.replies[&r1], Outcome::Ok(Reply::Entered { .. })));
    let r2 = s.request("m0", Command::Enter, true, t);
    s.settle();
    assert_eq!(refused(&s.replies[&r2]), Some(Refusal::TotpReplayed));
    // An older step is refused too (after the throttle delay).
    s.advance(70_000);
    let Totp::Valid { step } = t else {
        unreachable!()
    };
    let r3 = s.request("m0", Command::Enter, true, Totp::Valid { step: step - 1 });
    s.settle();
    assert_eq!(refused(&s.replies[&r3]), Some(Refusal::TotpReplayed));
    // Replay protection survives a restart.
    let mut s2 = Sim::new(s.vault.persistent().clone());
    let r4 = s2.request("m0", Command::Enter, true, t);
    s2.settle();
    assert_eq!(refused(&s2.replies[&r4]), Some(Refusal::TotpReplayed));
}

#[test]
fn failures_are_throttled_then_auto_lock() {
    let mut p = members(2, 1);
    p.policy.auto_lock_failures = 5;
    p.policy.throttle_base_ms = 1_000;
    let mut s = Sim::new(p);
    let t = s.fresh();
    let r = s.request("m0", Command::Enter, false, t);
    s.settle();
    assert_eq!(refused(&s.replies[&r]), Some(Refusal::WrongPassword));
    // Immediately again: throttled, and no key derivation happens.
    let t = s.fresh();
    let r = s.request("m0", Command::Enter, true, t);
    assert_eq!(s.vault.pending_checks(), 0);
    s.settle();
    assert_eq!(refused(&s.replies[&r]), Some(Refusal::Throttled));
    for _ in 0..4 {
        s.advance(61_000);
        let t = s.fresh();
        s.request("m1", Command::Enter, false, t);
        s.settle();
    }
    assert!(s.vault.is_locked(), "auto-lock after 5 failures");
    assert_eq!(s.vault.persistent().lock.as_ref().unwrap().by, "coffre");
    assert!(
        s.audit
            .iter()
            .any(|a| a.action == "lock" && a.detail.contains("auto-lock"))
    );
}

#[test]
fn enter_during_closing_reopens_after_close() {
    let mut s = Sim::new(members(2, 0));
    let a = s.enter("m0");
    let req = s.request("m0", Command::Leave { session: a }, false, Totp::Missing);
    let _ = req;
    assert_eq!(s.vault.phase(), Phase::Closing);
    // m1 enters while the close runs: the close result is still in the inbox.
    let t = s.fresh();
    let r = s.request("m1", Command::Enter, true, t);
    // The password check finishes before the close does.
    let checked = s.inbox.pop_back().unwrap();
    assert!(matches!(checked, Event::PasswordChecked { .. }));
    s.inbox.push_front(checked);
    s.deliver();
    assert!(matches!(s.replies[&r], Outcome::Ok(Reply::Entered { .. })));
    assert_eq!(s.vault.phase(), Phase::Closing);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Open);
    assert!(s.audit.iter().any(|a| a.detail.contains("reopened")));
    s.check_open_rule();
}

#[test]
fn leave_during_opening_closes_after_open() {
    let mut s = Sim::new(members(1, 0));
    let t = s.fresh();
    let r = s.request("m0", Command::Enter, true, t);
    s.deliver(); // password checked: Opening, open result pending
    assert_eq!(s.vault.phase(), Phase::Opening);
    let Outcome::Ok(Reply::Entered { session }) = s.replies[&r].clone() else {
        panic!()
    };
    s.request("m0", Command::Leave { session }, false, Totp::Missing);
    assert_eq!(s.vault.phase(), Phase::Opening);
    s.settle();
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
}

#[test]
fn invite_and_passwd_get_a_scoped_key_and_never_open() {
    let mut s = Sim::new(members(1, 1));
    // The sim asserts the shell had a kept key for each keyslot change.
    assert_eq!(
        s.run(
            "su0",
            Command::Invite {
                name: "new".into(),
                role: Role::Member
            }
        ),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.run("m0", Command::Passwd), Outcome::Ok(Reply::Done));
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held && s.kept.is_empty());
    assert_eq!(
        refused(&s.run(
            "m0",
            Command::Invite {
                name: "x".into(),
                role: Role::Member
            }
        )),
        Some(Refusal::NotPermitted)
    );
    assert_eq!(
        refused(&s.run(
            "su0",
            Command::Invite {
                name: "m0".into(),
                role: Role::Member
            }
        )),
        Some(Refusal::Invalid)
    );
    s.run("su0", Command::Lock { reason: "x".into() });
    assert_eq!(
        refused(&s.run(
            "su0",
            Command::Invite {
                name: "y".into(),
                role: Role::Member
            }
        )),
        Some(Refusal::Locked)
    );
}

#[test]
fn members_change_their_own_account_with_password_and_totp_never_while_locked() {
    let mut s = Sim::new(members(1, 1));
    let set = || Command::Account {
        change: AccountChange::WorkloadPassword {
            verifier: Verifier("$argon2id$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".into()),
        },
    };
    assert_eq!(s.run("m0", set()), Outcome::Ok(Reply::Done));
    assert_eq!(s.accounts_changed, vec!["m0".to_string()]);
    // Nothing opens, no key is kept.
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held && s.kept.is_empty());
    // A wrong password changes nothing.
    let t = s.fresh();
    let req = s.request("m0", set(), false, t);
    s.settle();
    assert_eq!(
        refused(&s.replies.remove(&req).unwrap()),
        Some(Refusal::WrongPassword)
    );
    assert_eq!(s.accounts_changed.len(), 1);
    s.run("su0", Command::Lock { reason: "x".into() });
    assert_eq!(refused(&s.run("m0", set())), Some(Refusal::Locked));
    assert_eq!(s.accounts_changed.len(), 1);
    // The verifier never reaches a Debug print.
    assert!(!format!("{:?}", set()).contains("argon2id"));
}

/// Finding 1: with quorum 2, one superuser could lock, lower the quorum
/// (or remove the other superuser) and unlock alone.
#[test]
fn locked_vault_refuses_quorum_change_and_superuser_removal() {
    let mut p = members(1, 2);
    p.policy.unlock_quorum = 2;
    let mut s = Sim::new(p);
    s.run(
        "su0",
        Command::Lock {
            reason: "drill".into(),
        },
    );
    assert_eq!(s.invitations_cancelled, 1, "the lock cancels invitations");
    // And so does a boot while locked (a crash between lock and wipe).
    let mut after = Vault::new(s.vault.persistent().clone());
    let fx = after.handle(s.now, Event::Boot { unclean: true });
    assert!(fx.iter().any(|f| matches!(f, Effect::CancelInvitations)));
    let t = s.fresh();
    let req = s.request("su0", Command::SetQuorum { quorum: 1 }, true, t);
    // Refused before any key derivation.
    assert_eq!(s.vault.pending_checks(), 0);
    s.settle();
    assert_eq!(refused(&s.replies[&req]), Some(Refusal::Locked));
    assert_eq!(s.vault.persistent().policy.unlock_quorum, 2);
    assert_eq!(
        refused(&s.run("su0", Command::MemberRemove { name: "su1".into() })),
        Some(Refusal::Locked)
    );
    assert!(s.vault.members().contains_key("su1"));
    assert_eq!(
        s.run("su0", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 1 })
    );
    assert!(s.vault.is_locked(), "one superuser never unlocks alone");
    // Switching to fast mode would keep plaintext in memory at the next
    // close: refused. Safe mode only reduces exposure: allowed.
    assert_eq!(
        refused(&s.run("su0", Command::SetMode { mode: Mode::Fast })),
        Some(Refusal::Locked)
    );
    assert_eq!(
        s.run("su0", Command::SetMode { mode: Mode::Safe }),
        Outcome::Ok(Reply::Done)
    );
    // The stolen-laptop flow: lock, then remove the member.
    assert_eq!(
        s.run("su0", Command::MemberRemove { name: "m0".into() }),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.removed, vec!["m0".to_string()]);
    assert_eq!(
        s.run("su1", Command::Unlock),
        Outcome::Ok(Reply::UnlockApproved { remaining: 0 })
    );
}

/// Finding 2: while locked nothing that uses the key is accepted, and a
/// check that started before the lock is refused when it ends, its key
/// wiped at once.
#[test]
fn locked_vault_refuses_invite_and_passwd_even_when_the_check_ends_after_the_lock() {
    let mut s = Sim::new(members(1, 2));
    for cmd in [
        Command::Passwd,
        Command::Invite {
            name: "new".into(),
            role: Role::Superuser,
        },
        Command::SetQuorum { quorum: 2 },
    ] {
        let who = if cmd == Command::Passwd { "m0" } else { "su1" };
        let t = s.fresh();
        let req = s.request(who, cmd.clone(), true, t);
        assert_eq!(s.vault.pending_checks(), 1);
        // The lock lands while the password is being checked.
        let checked = s.inbox.pop_front().unwrap();
        assert!(matches!(checked, Event::PasswordChecked { ok: true, .. }));
        s.run(
            "su0",
            Command::Lock {
                reason: "race".into(),
            },
        );
        s.inbox.push_back(checked);
        s.settle();
        assert_eq!(refused(&s.replies[&req]), Some(Refusal::Locked), "{cmd:?}");
        assert!(s.kept.is_empty(), "{cmd:?}: a key outlived the refusal");
        let t = s.fresh();
        let req = s.request(who, cmd.clone(), true, t);
        assert_eq!(
            s.vault.pending_checks(),
            0,
            "{cmd:?}: no derivation while locked"
        );
        s.settle();
        assert_eq!(refused(&s.replies[&req]), Some(Refusal::Locked), "{cmd:?}");
        s.run("su0", Command::Unlock);
        assert!(!s.vault.is_locked());
    }
    assert_eq!(s.vault.persistent().policy.unlock_quorum, 1);
}

/// An unlock approval checks the keyslot but never keeps its key.
#[test]
fn unlock_approval_never_keeps_a_key() {
    let mut s = Sim::new(members(0, 1));
    s.run("su0", Command::Lock { reason: "x".into() });
    let t = s.fresh();
    let fx = s.vault.handle(
        s.now,
        Event::Request(Request {
            req: ReqId(9_000),
            member: "su0".into(),
            source: source("192.0.2.1"),
            password: true,
            totp: t,
            command: Command::Unlock,
        }),
    );
    assert!(
        fx.iter().any(|f| matches!(
            f,
            Effect::CheckPassword {
                keep_key: false,
                ..
            }
        )),
        "{fx:?}"
    );
    assert!(
        !fx.iter()
            .any(|f| matches!(f, Effect::CheckPassword { keep_key: true, .. }))
    );
}

/// A member who joins while locked (an invitation issued before the lock)
/// is not added.
#[test]
fn member_joined_while_locked_is_refused() {
    let mut s = Sim::new(members(0, 1));
    s.run("su0", Command::Lock { reason: "x".into() });
    s.handle(Event::MemberJoined {
        member: Member {
            name: "late".into(),
            role: Role::Superuser,
            keyslot: 7,
            last_totp_step: None,
        },
    });
    assert!(!s.vault.members().contains_key("late"));
    assert!(
        s.audit
            .iter()
            .any(|a| a.action == "member_join" && a.result == "refused:locked")
    );
}

/// Finding 6: two invitations for one name made at the same time both
/// succeeded and the first temporary keyslot was never wiped.
#[test]
fn one_invitation_per_name_at_a_time() {
    let mut s = Sim::new(members(0, 2));
    let invite = Command::Invite {
        name: "carol".into(),
        role: Role::Member,
    };
    let t = s.fresh();
    let first = s.request("su0", invite.clone(), true, t);
    let t = s.fresh();
    let second = s.request("su1", invite.clone(), true, t);
    assert_eq!(
        s.vault.pending_checks(),
        1,
        "the second is refused before its check"
    );
    s.settle();
    assert_eq!(s.replies[&first], Outcome::Ok(Reply::Done));
    assert_eq!(refused(&s.replies[&second]), Some(Refusal::Invalid));
    assert!(s.kept.is_empty());
    // Cancelling one reduces exposure: allowed, even while locked, and
    // its keyslot check keeps no key.
    s.run("su0", Command::Lock { reason: "x".into() });
    let before = s.invitations_cancelled;
    let t = s.fresh();
    let fx = s.vault.handle(
        s.now,
        Event::Request(Request {
            req: ReqId(9_001),
            member: "su1".into(),
            source: source("192.0.2.1"),
            password: true,
            totp: t,
            command: Command::InviteCancel {
                name: "carol".into(),
            },
        }),
    );
    assert!(
        fx.iter().any(|f| matches!(
            f,
            Effect::CheckPassword {
                keep_key: false,
                ..
            }
        )),
        "{fx:?}"
    );
    assert_eq!(
        s.run(
            "su1",
            Command::InviteCancel {
                name: "carol".into()
            }
        ),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.invitations_cancelled, before + 1);
    assert_eq!(
        refused(&s.run(
            "m0",
            Command::InviteCancel {
                name: "carol".into()
            }
        )),
        Some(Refusal::UnknownMember)
    );
}

#[test]
fn restart_is_closed_or_still_locked() {
    let mut s = Sim::new(members(1, 1));
    s.enter("m0");
    let mut after = Vault::new(s.vault.persistent().clone());
    let fx = after.handle(Millis(2), Event::Boot { unclean: true });
    assert_eq!(after.phase(), Phase::Closed);
    assert!(
        fx.iter()
            .any(|f| matches!(f, Effect::Audit(a) if a.detail.contains("unclean")))
    );
    s.run("su0", Command::Lock { reason: "x".into() });
    let mut after = Vault::new(s.vault.persistent().clone());
    after.handle(Millis(3), Event::Boot { unclean: true });
    assert_eq!(after.status().state, "locked");
}

#[derive(Clone, Debug)]
enum Op {
    Enter(usize, bool, u8),
    Leave(usize),
    Heartbeat(usize),
    TaskAdd(usize, u64),
    TaskCancel(usize),
    Lock(usize),
    Unlock(usize),
    Deliver,
    Advance(u64),
    CloseFails(bool),
    Restart,
    Quorum(usize, u32),
    Remove(usize, usize),
    Role(usize, usize, bool),
    Invite(usize, bool),
    Passwd(usize),
    Mode(usize, bool),
    Join(bool),
    Approve(usize, usize),
    /// The organisation's directory no longer lets this member in.
    Disqualify(usize),
    /// ... or no longer lets this superuser be one.
    Withdraw(usize),
    /// The directory refuses (or cannot answer) the oldest check waiting.
    SourceRefuse(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, prop::bool::weighted(0.8), 0..10u8).prop_map(|(m, ok, t)| Op::Enter(m, ok, t)),
        3 => (0..4usize).prop_map(Op::Leave),
        1 => (0..4usize).prop_map(Op::Heartbeat),
        1 => (0..4usize, 1..120_000u64).prop_map(|(m, d)| Op::TaskAdd(m, d)),
        1 => (0..4usize).prop_map(Op::TaskCancel),
        1 => (0..2usize).prop_map(Op::Lock),
        2 => (0..2usize).prop_map(Op::Unlock),
        6 => Just(Op::Deliver),
        2 => (0..40_000u64).prop_map(Op::Advance),
        1 => any::<bool>().prop_map(Op::CloseFails),
        1 => Just(Op::Restart),
        1 => (0..4usize, 0..4u32).prop_map(|(m, q)| Op::Quorum(m, q)),
        1 => (0..4usize, 0..4usize).prop_map(|(m, t)| Op::Remove(m, t)),
        1 => (0..4usize, 0..4usize, any::<bool>()).prop_map(|(m, t, su)| Op::Role(m, t, su)),
        1 => (0..4usize, any::<bool>()).prop_map(|(m, su)| Op::Invite(m, su)),
        1 => (0..4usize).prop_map(Op::Passwd),
        1 => (0..4usize, any::<bool>()).prop_map(|(m, f)| Op::Mode(m, f)),
        1 => any::<bool>().prop_map(Op::Join),
        2 => (0..4usize, 0..3usize).prop_map(|(m, which)| Op::Approve(m, which)),
        1 => (0..4usize).prop_map(Op::Disqualify),
        1 => (0..4usize).prop_map(Op::Withdraw),
        1 => any::<bool>().prop_map(Op::SourceRefuse),
    ]
}

fn name(i: usize) -> String {
    if i < 2 {
        format!("su{i}")
    } else {
        format!("m{}", i - 2)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Over random histories: no key outside OPEN/OPENING/CLOSING, never
    /// OPEN while locked, the OPEN rule at every quiescent point, every
    /// transition audited, no effect keeps a key while locked (checked in
    /// Sim). LOCKED is left only by an unlock that the quorum in force at
    /// the lock reached, and while locked nothing grows: no member, no
    /// superuser lost or gained, no quorum change.
    #[test]
    fn vault_rules_hold(ops in prop::collection::vec(op(), 1..120)) {
        let mut p = members(2, 2);
        p.policy.unlock_quorum = 2;
        p.policy.grace_ms = 20_000;
        p.policy.auto_lock_failures = 6;
        let mut s = Sim::new(p);
        let mut joined = 0u32;
        let mut lock_quorum = 0u32;
        for op in ops {
            let was_locked = s.vault.is_locked();
            let audited = s.audit.len();
            let members_before: std::collections::BTreeSet<String> = s.vault.members().keys().cloned().collect();
            let supers_before: Vec<String> = s.vault.members().values().filter(|m| m.role == Role::Superuser).map(|m| m.name.clone()).collect();
            let quorum_before = s.vault.persistent().policy.unlock_quorum;
            match op {
                Op::Enter(m, ok, t) => {
                    let totp = match t { 0 => Totp::Invalid, 1 => Totp::Valid { step: 0 }, _ => s.fresh() };
                    s.request(&name(m), Command::Enter, ok, totp);
                }
                Op::Leave(m) | Op::Heartbeat(m) | Op::TaskAdd(m, _) | Op::TaskCancel(m) => {
                    let who = name(m);
                    let session = s.vault.sessions().find(|x| x.member == who).map(|x| x.id).unwrap_or(SessionId(999));
                    let cmd = match op {
                        Op::Leave(_) => Command::Leave { session },
                        Op::Heartbeat(_) => Command::Heartbeat { session },
                        Op::TaskAdd(_, d) => Command::TaskAdd { session, name: "t".into(), claimed_owner: None, duration_ms: d, workload: None },
                        _ => Command::TaskCancel { session, task: TaskId(1) },
                    };
                    s.request(&who, cmd, false, Totp::Missing);
                }
                Op::Lock(m) => { let t = s.fresh(); s.request(&name(m), Command::Lock { reason: "prop".into() }, true, t); }
                Op::Unlock(m) => { let t = s.fresh(); s.request(&name(m), Command::Unlock, true, t); }
                Op::Deliver => { s.deliver(); }
                Op::Disqualify(m) => s.handle(Event::Disqualified { member: name(m), reason: "prop".into() }),
                Op::Withdraw(m) => s.handle(Event::ApprovalsWithdrawn { member: name(m), reason: "prop".into() }),
                Op::SourceRefuse(unreachable) => {
                    let at = s.inbox.iter().position(|e| matches!(e, Event::PasswordChecked { .. }));
                    if let Some(Event::PasswordChecked { req, .. }) = at.and_then(|i| s.inbox.remove(i)) {
                        s.handle(Event::SourceRefused { req, unreachable, detail: "prop".into() });
                    }
                }
                Op::Advance(ms) => s.advance(ms),
                Op::CloseFails(f) => s.close_fails = f,
                Op::Quorum(m, q) => { let t = s.fresh(); s.request(&name(m), Command::SetQuorum { quorum: q }, true, t); }
                Op::Remove(m, target) => { let t = s.fresh(); s.request(&name(m), Command::MemberRemove { name: name(target) }, true, t); }
                Op::Role(m, target, su) => {
                    let t = s.fresh();
                    let role = if su { Role::Superuser } else { Role::Member };
                    s.request(&name(m), Command::SetRole { name: name(target), role }, true, t);
                }
                Op::Invite(m, su) => {
                    let t = s.fresh();
                    let role = if su { Role::Superuser } else { Role::Member };
                    s.request(&name(m), Command::Invite { name: "new".into(), role }, true, t);
                }
                Op::Passwd(m) => { let t = s.fresh(); s.request(&name(m), Command::Passwd, true, t); }
                Op::Mode(m, fast) => {
                    let t = s.fresh();
                    let mode = if fast { Mode::Fast } else { Mode::Safe };
                    s.request(&name(m), Command::SetMode { mode }, true, t);
                }
                Op::Join(su) => {
                    joined += 1;
                    let role = if su { Role::Superuser } else { Role::Member };
                    s.handle(Event::MemberJoined { member: Member { name: format!("j{joined}"), role, keyslot: 20 + joined, last_totp_step: None } });
                }
                Op::Approve(m, which) => {
                    let ids: Vec<String> = s.vault.status().proposals.iter().map(|p| p.id.clone()).collect();
                    let id = ids.get(which).cloned().unwrap_or_else(|| "0".into());
                    let t = s.fresh();
                    s.request(&name(m), Command::Approve { id }, true, t);
                }
                Op::Restart => {
                    let p = s.vault.persistent().clone();
                    let close_fails = s.close_fails;
                    s = Sim::new(p);
                    s.close_fails = close_fails;
                    s.handle(Event::Boot { unclean: true });
                }
            }
            if !was_locked && s.vault.is_locked() {
                lock_quorum = s.vault.persistent().policy.unlock_quorum;
            }
            if was_locked && !s.vault.is_locked() {
                let unlock = s.audit[audited.min(s.audit.len())..].iter().find(|a| a.action == "unlock" && a.result == "ok");
                prop_assert!(unlock.is_some(), "LOCKED left without an unlock");
                let approvers: std::collections::BTreeSet<&str> = unlock.unwrap().detail.trim_start_matches("unlocked by ").split(", ").collect();
                prop_assert!(approvers.len() >= lock_quorum as usize, "unlocked by {approvers:?}, quorum at the lock {lock_quorum}");
                for a in &approvers {
                    prop_assert!(supers_before.iter().any(|x| x == a), "{a} approved but is not a superuser");
                }
            }
            // Outside a lock too, with a quorum above 1 the quorum and the
            // superusers (but for joins) change only by the quorum's approval.
            // Never fewer superusers than the quorum, nor none.
            let supers_now = s.vault.members().values().filter(|m| m.role == Role::Superuser).count();
            prop_assert!(supers_now >= 1 && supers_now >= s.vault.persistent().policy.unlock_quorum as usize, "{supers_now} superusers, quorum {}", s.vault.persistent().policy.unlock_quorum);
            if quorum_before > 1 {
                let supers_after: Vec<String> = s.vault.members().values().filter(|m| m.role == Role::Superuser).map(|m| m.name.clone()).collect();
                let lost = supers_before.iter().any(|x| !supers_after.contains(x));
                // A promotion: a member before, a superuser after.
                let promoted = supers_after.iter().any(|x| !supers_before.contains(x) && members_before.contains(x));
                if lost || promoted || s.vault.persistent().policy.unlock_quorum != quorum_before {
                    let approved = s.audit[audited.min(s.audit.len())..].iter().find(|a| a.action == "proposal" && a.result == "approved");
                    prop_assert!(approved.is_some(), "quorum or superusers changed without a proposal");
                    let names: std::collections::BTreeSet<&str> = approved.unwrap().detail.rsplit("approved by ").next().unwrap().split(", ").collect();
                    prop_assert!(names.len() >= quorum_before as usize, "approved by {names:?}, quorum {quorum_before}");
                }
            }
            if was_locked {
                let members_after: std::collections::BTreeSet<String> = s.vault.members().keys().cloned().collect();
                prop_assert!(members_after.is_subset(&members_before), "a member was added while locked");
                let supers_after: Vec<String> = s.vault.members().values().filter(|m| m.role == Role::Superuser).map(|m| m.name.clone()).collect();
                prop_assert_eq!(&supers_after, &supers_before, "superusers changed while locked");
                prop_assert_eq!(s.vault.persistent().policy.unlock_quorum, quorum_before, "quorum changed while locked");
            }
            s.check();
        }
        s.close_fails = false;
        s.settle();
        s.check_open_rule();
    }
}

/// Issue 20: a scheduler on the bus keeps an open vault open for a
/// member, never opens a closed or locked one, and cancels only its own
/// tasks.
#[test]
fn a_schedulers_task_keeps_the_open_vault_open_but_never_opens_it() {
    let mut s = Sim::new(members(2, 1));
    let add = |by: &str, ms: u64| Command::ScheduledTaskAdd {
        by: by.into(),
        name: "nightly build".into(),
        duration_ms: ms,
    };
    // Closed: refused, and still closed.
    let o = s.session_cmd("m0", add("sched1", 60_000));
    assert_eq!(refused(&o), Some(Refusal::Busy));
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(!s.key_held);
    // Open: accepted, and it outlives the member's departure.
    let a = s.enter("m0");
    assert_eq!(
        refused(&s.session_cmd("m0", add("sched1", 0))),
        Some(Refusal::Invalid)
    );
    let task = match s.session_cmd("m0", add("sched1", 60_000)) {
        Outcome::Ok(Reply::TaskAdded { task, .. }) => task,
        other => panic!("{other:?}"),
    };
    let t = s.vault.status().tasks;
    assert_eq!(
        (t[0].owner.as_str(), t[0].by.as_deref()),
        ("m0", Some("sched1"))
    );
    s.session_cmd("m0", Command::Leave { session: a });
    assert_eq!(
        s.vault.phase(),
        Phase::Open,
        "the scheduler's task keeps it open"
    );
    // Another scheduler cannot cancel it; its own can.
    let cancel = |by: &str| Command::ScheduledTaskCancel {
        by: by.into(),
        task,
    };
    assert_eq!(
        refused(&s.session_cmd("m0", cancel("sched2"))),
        Some(Refusal::NoTask)
    );
    assert_eq!(
        s.session_cmd("m0", cancel("sched1")),
        Outcome::Ok(Reply::Done)
    );
    assert_eq!(s.vault.phase(), Phase::Closed);
    assert!(s.audit.iter().any(|r| r.action == "task_add"
        && r.result == "ok"
        && r.detail.contains("added by sched1 for m0")));
    // A scheduler naming someone who is not a member is refused, and
    // never counts towards the auto-lock however often it happens.
    let a = s.enter("m0");
    for _ in 0..40 {
        assert_eq!(
            refused(&s.session_cmd("ghost", add("sched1", 60_000))),
            Some(Refusal::UnknownMember)
        );
    }
    assert!(!s.vault.is_locked());
    // At most MAX_TASKS_PER_SCHEDULER tasks each.
    for _ in 0..coffre_vault::MAX_TASKS_PER_SCHEDULER {
        assert!(matches!(
            s.session_cmd("m0", add("sched1", 60_000)),
            Outcome::Ok(Reply::TaskAdded { .. })
        ));
    }
    assert_eq!(
        refused(&s.session_cmd("m0", add("sched1", 60_000))),
        Some(Refusal::Busy)
    );
    s.session_cmd("m0", Command::Leave { session: a });
    // Locked: refused.
    s.run("su0", Command::Lock { reason: "x".into() });
    assert_eq!(
        refused(&s.session_cmd("m0", add("sched1", 60_000))),
        Some(Refusal::Locked)
    );
    assert!(s.vault.is_locked());
}
