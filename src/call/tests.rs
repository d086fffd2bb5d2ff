//! The call machine, input by input, without any I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{
    Action, ActionKind, Agent, Mode, Nobody, PresencePolicy, Profile, ReplyRule, Room,
};
use crate::eivr::{Command, Event, EventLine};

fn action(kind: ActionKind) -> Action {
    Action { kind, prompt: None }
}

fn profile() -> Profile {
    let mut keys = BTreeMap::new();
    keys.insert('0', action(ActionKind::Continue("operator".into())));
    keys.insert('9', action(ActionKind::Hangup));
    Profile {
        name: "sales".into(),
        account: "pbx".into(),
        targets: vec!["alice@example.org".into(), "bob@example.org".into()],
        template: "Call from $caller_name$ <$caller$>".into(),
        confirm: "Call from $caller$: $outcome$".into(),
        help: "Reply 1 or 2".into(),
        hold: vec!["moh/a".into(), "moh/b".into()],
        variables: vec!["POPIVR_CALLER_NUM".into(), "POPIVR_CALLER_NAME".into()],
        sip_headers: vec![],
        replies: vec![
            ReplyRule {
                words: vec!["1".into(), "desk".into()],
                action: action(ActionKind::Continue("desk".into())),
            },
            ReplyRule {
                words: vec!["2".into(), "vm".into()],
                action: Action {
                    kind: ActionKind::Continue("voicemail".into()),
                    prompt: Some("vm-intro".into()),
                },
            },
            ReplyRule {
                words: vec!["fwd".into()],
                action: action(ActionKind::Forward(None)),
            },
            ReplyRule {
                words: vec!["h".into()],
                action: action(ActionKind::Hangup),
            },
        ],
        keys,
        timeout: Duration::from_secs(30),
        default_action: action(ActionKind::Continue("voicemail".into())),
        forward_allow: vec!["_2XXX".into()],
        mode: Mode::Interactive,
        // The presence tests below set `Available`; the others pop
        // whoever is a target.
        presence: PresencePolicy::Any,
        nobody: Nobody::Default,
        presence_wait: Duration::from_millis(1500),
        late_reply: crate::claim::LATE_REPLY,
        taken: "taken by $agent$: $outcome$".into(),
        missed: "Missed call from $caller$".into(),
        url: None,
        room: None,
        origin: "test".into(),
    }
}

fn ev(event: Event) -> Input {
    Input::Event(EventLine {
        ts: 1_700_000_000,
        event,
    })
}

fn msg(from: &str, body: &str) -> Input {
    message(from, &format!("{from}/phone"), MsgKind::Chat, body)
}

fn message(from_bare: &str, from_full: &str, kind: MsgKind, body: &str) -> Input {
    Input::Message(IncomingMessage {
        from_bare: from_bare.into(),
        from_full: from_full.into(),
        kind,
        body: Some(body.into()),
        delayed: false,
        forwarded: false,
        thread: None,
        to: Addressed::Bare,
    })
}

fn commands(out: &[Output]) -> Vec<Command> {
    out.iter()
        .filter_map(|o| match o {
            Output::Command(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn sent(out: &[Output]) -> Vec<(String, String)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(m) => Some((m.to.clone(), m.body.clone())),
            _ => None,
        })
        .collect()
}

fn var<'a>(cmds: &'a [Command], name: &str) -> Option<&'a str> {
    cmds.iter().find_map(|c| match c {
        Command::SetVars(vars) => vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str()),
        _ => None,
    })
}

/// A call that has started, read its variables and popped both agents.
fn popped_call() -> (Call, Vec<Output>) {
    popped_call_with(profile())
}

#[test]
fn audio_is_the_very_first_output_and_one_file_stays_queued() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    let out = call.start();
    assert_eq!(out[0], Output::Command(Command::Play("moh/a".into())));
    assert_eq!(out[1], Output::Command(Command::Append("moh/b".into())));
    assert!(!matches!(out[2], Output::Command(Command::Append(_))));
    assert!(out.contains(&Output::Connect));
    assert!(out.contains(&Output::SetTimer(TimerId::Reply, Duration::from_secs(30))));
}

#[test]
fn the_hold_rotation_keeps_its_order() {
    let (mut call, _) = popped_call();
    // Playing a, b queued: when a ends it goes behind b, and so on.
    let mut played = vec![];
    for file in ["moh/a", "moh/b", "moh/a", "moh/b"] {
        played.extend(commands(&call.handle(ev(Event::Finished(file.into())))));
    }
    let appended: Vec<_> = played
        .iter()
        .map(|c| match c {
            Command::Append(f) => f.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(appended, ["moh/a", "moh/b", "moh/a", "moh/b"]);
}

#[test]
fn a_single_hold_file_is_queued_behind_itself() {
    let mut p = profile();
    p.hold = vec!["moh/only".into()];
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]);
    let out = call.start();
    assert_eq!(
        commands(&out)[..2],
        [
            Command::Play("moh/only".into()),
            Command::Append("moh/only".into())
        ]
    );
}

#[test]
fn variables_are_read_one_name_per_g() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    let gets: Vec<_> = commands(&call.start())
        .into_iter()
        .filter(|c| matches!(c, Command::GetVars(_)))
        .collect();
    assert_eq!(
        gets,
        [
            Command::GetVars(vec!["POPIVR_CALLER_NUM".into()]),
            Command::GetVars(vec!["POPIVR_CALLER_NAME".into()])
        ]
    );
}

#[test]
fn reads_asked_before_the_profile_was_known_are_not_asked_again() {
    // serve mode read POPIVR_CALLER_NUM and, for another profile,
    // CUSTOMER_ID with `P`; this profile still needs POPIVR_CALLER_NAME.
    let asked = vec!["POPIVR_CALLER_NUM".to_string(), "CUSTOMER_ID".to_string()];
    let mut p = profile();
    p.template = "Call from $caller_name$ <$caller$>${CUSTOMER_ID}".into();
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]).with_asked(asked);
    let gets: Vec<_> = commands(&call.start())
        .into_iter()
        .filter(|c| matches!(c, Command::GetVars(_)))
        .collect();
    assert_eq!(gets, [Command::GetVars(vec!["POPIVR_CALLER_NAME".into()])]);
    // The answers come in the order asked: the early ones first.
    call.handle(ev(Event::Vars("POPIVR_CALLER_NUM=555".into())));
    call.handle(ev(Event::Vars("CUSTOMER_ID=C-42".into())));
    call.handle(ev(Event::Vars("POPIVR_CALLER_NAME=Doe, John".into())));
    let pops = sent(&call.handle(Input::Xmpp(XmppStatus::Online)));
    // The other profile's variable is not this call's data.
    assert_eq!(pops[0].1, "Call from Doe, John <555>");
}

#[test]
fn a_finished_hold_file_is_queued_again() {
    let (mut call, _) = popped_call();
    let out = call.handle(ev(Event::Finished("moh/b".into())));
    assert_eq!(commands(&out), [Command::Append("moh/b".into())]);
    // Files that are not hold audio are not looped.
    assert!(commands(&call.handle(ev(Event::Finished("other".into())))).is_empty());
}

#[test]
fn the_pop_waits_for_both_the_login_and_the_caller_data() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    call.start();
    assert!(sent(&call.handle(Input::Xmpp(XmppStatus::Online))).is_empty());
    assert!(sent(&call.handle(ev(Event::Vars("POPIVR_CALLER_NUM=555".into())))).is_empty());
    let out = call.handle(ev(Event::Vars("POPIVR_CALLER_NAME=Doe%2C%20John".into())));
    assert_eq!(
        sent(&out),
        [
            (
                "alice@example.org".to_string(),
                "Call from Doe, John <555>".to_string()
            ),
            (
                "bob@example.org".to_string(),
                "Call from Doe, John <555>".to_string()
            )
        ]
    );
}

#[test]
fn a_missing_g_answer_does_not_hold_the_pop_back_forever() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    call.start();
    call.handle(Input::Xmpp(XmppStatus::Online));
    let out = call.handle(Input::Timer(TimerId::Setup));
    assert_eq!(sent(&out).len(), 2);
}

#[test]
fn a_reply_continues_the_call_and_confirms_to_the_agents() {
    let (mut call, _) = popped_call();
    let out = call.handle(msg("alice@example.org", "1"));
    let cmds = commands(&out);
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("desk"));
    assert_eq!(var(&cmds, "POPIVR_AGENT"), Some("alice@example.org"));
    assert_eq!(var(&cmds, "POPIVR_REPLY"), Some("1"));
    assert!(matches!(cmds.last(), Some(Command::Exit(_))));
    assert!(out.contains(&Output::CancelTimer(TimerId::Reply)));
    let confirmations = sent(&out);
    assert_eq!(confirmations.len(), 2);
    assert_eq!(confirmations[0].1, "Call from 5551234: sent to desk");
    // The confirmation reaches XMPP before `E` reaches Asterisk.
    let send_at = out
        .iter()
        .position(|o| matches!(o, Output::Send(_)))
        .unwrap();
    let exit_at = out
        .iter()
        .position(|o| matches!(o, Output::Command(Command::Exit(_))))
        .unwrap();
    assert!(send_at < exit_at);
}

#[test]
fn exactly_one_action_whatever_else_arrives() {
    let (mut call, _) = popped_call();
    let first = call.handle(msg("alice@example.org", "1"));
    assert_eq!(
        commands(&first)
            .iter()
            .filter(|c| matches!(c, Command::Exit(_)))
            .count(),
        1
    );
    for input in [
        msg("bob@example.org", "2"),
        ev(Event::Dtmf('0')),
        Input::Timer(TimerId::Reply),
    ] {
        let out = call.handle(input);
        assert!(commands(&out).is_empty(), "{out:?}");
    }
}

#[test]
fn a_late_reply_is_told_the_call_was_handled() {
    let (mut call, _) = popped_call();
    call.handle(msg("alice@example.org", "1"));
    let out = call.handle(msg("bob@example.org", "2"));
    assert_eq!(
        sent(&out),
        [(
            "bob@example.org".into(),
            "This call was already handled: sent to desk.".into()
        )]
    );
}

#[test]
fn replies_are_matched_case_insensitively_by_first_word() {
    let (mut call, _) = popped_call();
    let cmds = commands(&call.handle(msg("bob@example.org", "  DESK please ")));
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("desk"));
    assert_eq!(var(&cmds, "POPIVR_REPLY"), Some("DESK please"));
}

#[test]
fn an_unknown_reply_gets_help_and_the_call_keeps_waiting() {
    let (mut call, _) = popped_call();
    let out = call.handle(msg("alice@example.org", "what?"));
    assert!(commands(&out).is_empty());
    assert_eq!(
        sent(&out),
        [("alice@example.org".into(), "Reply 1 or 2".into())]
    );
    let cmds = commands(&call.handle(msg("alice@example.org", "h")));
    assert!(matches!(cmds.last(), Some(Command::Hangup(_))));
}

#[test]
fn forward_takes_an_allowed_number_only() {
    let (mut call, _) = popped_call();
    let out = call.handle(msg("alice@example.org", "fwd 9999"));
    assert!(commands(&out).is_empty());
    assert_eq!(sent(&out).len(), 1);
    assert!(commands(&call.handle(msg("alice@example.org", "fwd"))).is_empty());
    let cmds = commands(&call.handle(msg("alice@example.org", "fwd 2001")));
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("forward"));
    assert_eq!(var(&cmds, "POPIVR_TARGET"), Some("2001"));
}

#[test]
fn only_the_targets_may_steer_the_call() {
    let (mut call, _) = popped_call();
    let hostile = [
        msg("mallory@example.org", "1"),
        msg("alice@example.org.evil", "1"),
        msg("alice@example.or", "1"),
        msg("example.org", "1"),
    ];
    for input in hostile {
        assert!(
            call.handle(input)
                .iter()
                .all(|o| !matches!(o, Output::Command(_) | Output::Send(_)))
        );
    }
}

#[test]
fn delayed_forwarded_and_non_chat_messages_never_steer() {
    let (mut call, _) = popped_call();
    let base = IncomingMessage {
        from_bare: "alice@example.org".into(),
        from_full: "alice@example.org/x".into(),
        kind: MsgKind::Chat,
        body: Some("1".into()),
        delayed: false,
        forwarded: false,
        thread: None,
        to: Addressed::Bare,
    };
    let variants = [
        IncomingMessage {
            delayed: true,
            ..base.clone()
        },
        IncomingMessage {
            forwarded: true,
            ..base.clone()
        },
        IncomingMessage {
            kind: MsgKind::Groupchat,
            ..base.clone()
        },
        IncomingMessage {
            kind: MsgKind::Headline,
            ..base.clone()
        },
        IncomingMessage {
            kind: MsgKind::Error,
            ..base.clone()
        },
        IncomingMessage {
            body: None,
            ..base.clone()
        },
    ];
    for m in variants {
        assert!(
            commands(&call.handle(Input::Message(m.clone()))).is_empty(),
            "{m:?}"
        );
    }
    assert!(!commands(&call.handle(Input::Message(base))).is_empty());
}

#[test]
fn replies_before_the_pop_do_not_steer() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    call.start();
    call.handle(Input::Xmpp(XmppStatus::Online));
    // Logged in, but the caller data (and so the pop) is not out yet.
    assert!(commands(&call.handle(msg("alice@example.org", "1"))).is_empty());
}

#[test]
fn a_key_steers_the_call_without_any_agent() {
    let (mut call, _) = popped_call();
    assert!(commands(&call.handle(ev(Event::Dtmf('5')))).is_empty());
    let out = call.handle(ev(Event::Dtmf('0')));
    let cmds = commands(&out);
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("operator"));
    assert_eq!(var(&cmds, "POPIVR_REPLY"), Some("0"));
    assert_eq!(var(&cmds, "POPIVR_AGENT"), Some(""));
    // The agents' pop is not left dangling.
    assert_eq!(sent(&out).len(), 2);
}

#[test]
fn the_timeout_takes_the_default_action() {
    let (mut call, _) = popped_call();
    let cmds = commands(&call.handle(Input::Timer(TimerId::Reply)));
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("voicemail"));
    assert_eq!(var(&cmds, "POPIVR_REPLY"), Some("timeout"));
    assert!(matches!(cmds.last(), Some(Command::Exit(_))));
}

#[test]
fn a_prompt_interrupts_the_hold_audio_and_delays_the_exit() {
    let (mut call, _) = popped_call();
    let cmds = commands(&call.handle(msg("alice@example.org", "vm")));
    assert_eq!(cmds[0], Command::Play("vm-intro".into()));
    assert!(!cmds.iter().any(|c| matches!(c, Command::Exit(_))));
    // Hold files ending now are not queued again.
    assert!(commands(&call.handle(ev(Event::Finished("moh/a".into())))).is_empty());
    let cmds = commands(&call.handle(ev(Event::Finished("vm-intro".into()))));
    assert!(matches!(cmds.as_slice(), [Command::Exit(_)]));
}

#[test]
fn a_missing_prompt_does_not_strand_the_call() {
    let (mut call, _) = popped_call();
    call.handle(msg("alice@example.org", "vm"));
    let cmds = commands(&call.handle(ev(Event::Failed(Some("vm-intro".into())))));
    assert!(matches!(cmds.as_slice(), [Command::Exit(_)]));
}

#[test]
fn a_missing_hold_file_leaves_the_rotation() {
    let (mut call, _) = popped_call();
    let out = call.handle(ev(Event::Failed(Some("moh/a".into()))));
    assert_eq!(commands(&out), [Command::Append("moh/b".into())]);
    assert!(commands(&call.handle(ev(Event::Finished("moh/a".into())))).is_empty());
    assert_eq!(
        commands(&call.handle(ev(Event::Finished("moh/b".into())))),
        [Command::Append("moh/b".into())]
    );
}

#[test]
fn a_caller_hangup_ends_the_call_and_tells_the_agents() {
    let (mut call, _) = popped_call();
    let out = call.handle(ev(Event::Hangup));
    assert!(out.contains(&Output::Done));
    assert!(commands(&out).is_empty());
    let notices = sent(&out);
    assert_eq!(notices.len(), 2);
    assert!(notices[0].1.contains("5551234"), "{notices:?}");
    assert!(call.is_done());
    assert!(call.handle(msg("alice@example.org", "1")).is_empty());
}

#[test]
fn with_option_i_the_hangup_is_answered_with_h() {
    let (mut call, _) = popped_call();
    let out = call.handle(ev(Event::Inform("HANGUP".into())));
    assert!(matches!(commands(&out).as_slice(), [Command::Hangup(_)]));
    assert!(!call.is_done());
    assert!(call.handle(ev(Event::Hangup)).contains(&Output::Done));
}

#[test]
fn xmpp_failure_leaves_the_call_to_its_timeout() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    call.start();
    let out = call.handle(Input::Xmpp(XmppStatus::Failed("connection refused".into())));
    assert!(commands(&out).is_empty());
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Log(Level::Error, t) if t.contains("connection refused")))
    );
    let cmds = commands(&call.handle(Input::Timer(TimerId::Reply)));
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("voicemail"));
    assert!(sent(&call.handle(Input::Closed)).is_empty());
}

#[test]
fn a_keys_only_profile_never_connects() {
    let mut p = profile();
    p.targets.clear();
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]);
    assert!(!call.start().contains(&Output::Connect));
}

#[test]
fn caller_data_reaches_the_pop_as_text_only() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    call.start();
    call.handle(ev(Event::Vars(
        "POPIVR_CALLER_NUM=%24caller_name%24".into(),
    )));
    call.handle(ev(Event::Vars(
        "POPIVR_CALLER_NAME=%24%7BEXTEN%7D%20%5Bsip.X%5D".into(),
    )));
    let out = call.handle(Input::Xmpp(XmppStatus::Online));
    assert_eq!(
        sent(&out)[0].1,
        "Call from ${EXTEN} [sip.X] <$caller_name$>"
    );
}

#[test]
fn each_agent_sees_their_own_values_and_who_answered() {
    let mut p = profile();
    p.template = "Pop for desk $desk$".into();
    p.confirm = "$outcome$ by $agent$, your desk $desk$".into();
    p.taken = "taken by $agent$, your desk $desk$".into();
    let agents = BTreeMap::from([
        agent("alice@example.org", &[("desk", "2001")], None, 0),
        agent("bob@example.org", &[("desk", "2002")], None, 0),
    ]);
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]).with_agents(Arc::new(agents));
    call.start();
    call.handle(Input::Timer(TimerId::Setup));
    let pops = sent(&call.handle(Input::Xmpp(XmppStatus::Online)));
    assert_eq!(pops[0].1, "Pop for desk 2001");
    assert_eq!(pops[1].1, "Pop for desk 2002");
    let confirms = sent(&call.handle(msg("bob@example.org", "1")));
    assert_eq!(
        confirms[0],
        (
            "alice@example.org".into(),
            "taken by bob@example.org, your desk 2001".into()
        )
    );
    assert_eq!(
        confirms[1],
        (
            "bob@example.org".into(),
            "sent to desk by bob@example.org, your desk 2002".into()
        )
    );
}

#[test]
fn sip_headers_come_from_variables_the_dialplan_set() {
    let mut p = profile();
    p.sip_headers = vec!["X-Customer-Id".into()];
    p.variables.clear();
    p.template = "Customer [sip.X-Customer-Id]".into();
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]);
    let gets: Vec<_> = commands(&call.start())
        .into_iter()
        .filter(|c| matches!(c, Command::GetVars(_)))
        .collect();
    // No comma in the name: Asterisk would split it.
    assert_eq!(
        gets,
        [Command::GetVars(vec!["POPIVR_SIP_X-Customer-Id".into()])]
    );
    call.handle(ev(Event::Vars(
        "POPIVR_SIP_X-Customer-Id=C-42, gold".into(),
    )));
    let pops = sent(&call.handle(Input::Xmpp(XmppStatus::Online)));
    assert_eq!(pops[0].1, "Customer C-42, gold");
}

fn agent(
    jid: &str,
    values: &[(&str, &str)],
    exten: Option<&str>,
    priority: i32,
) -> (String, Agent) {
    let a = Agent {
        name: jid.into(),
        jid: jid.into(),
        values: values
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        exten: exten.map(str::to_string),
        priority,
        origin: "test".into(),
    };
    (jid.to_string(), a)
}

fn presence(full: &str, show: Show) -> Input {
    Input::Presence(IncomingPresence {
        from_bare: full.split('/').next().unwrap().into(),
        from_full: full.into(),
        show,
        status: None,
        muc: None,
        sibling: None,
    })
}

fn roster(subscribed: &[&str]) -> Input {
    Input::Roster(
        subscribed
            .iter()
            .map(|j| RosterItem {
                jid: j.to_string(),
                subscribed: true,
                asked: false,
            })
            .collect(),
    )
}

fn with_presence(mut p: Profile, targets: &[&str]) -> Profile {
    p.presence = PresencePolicy::Available;
    p.targets = targets.iter().map(|t| t.to_string()).collect();
    p
}

/// Started, variables read, logged in: with presence-aware profiles,
/// waiting for roster and presence.
fn online_call(p: Profile) -> (Call, Vec<Output>) {
    popped_call_with(p)
}

fn to(out: &[Output]) -> Vec<String> {
    sent(out).into_iter().map(|(to, _)| to).collect()
}

const A: &str = "alice@example.org";
const B: &str = "bob@example.org";
const C: &str = "carol@example.org";

#[test]
fn the_pop_goes_only_to_available_agents_as_they_are_heard() {
    let p = with_presence(profile(), &[A, B, C]);
    let (mut call, out) = online_call(p);
    assert!(sent(&out).is_empty(), "no pop before presence is known");
    assert!(out.contains(&Output::SetTimer(
        TimerId::Presence,
        Duration::from_millis(1500)
    )));
    assert!(sent(&call.handle(roster(&[A, B, C]))).is_empty());
    assert!(sent(&call.handle(presence("alice@example.org/phone", Show::Away))).is_empty());
    // The first available target gets the pop at once, without waiting
    // for carol, whom the server may never report (ejabberd does not
    // answer probes for offline contacts).
    let out = call.handle(presence("bob@example.org/desk", Show::Chat));
    assert_eq!(to(&out), [B]);
    assert!(out.contains(&Output::CancelTimer(TimerId::Presence)));
    assert!(sent(&call.handle(presence("carol@example.org", Show::Unavailable))).is_empty());
    // Only those popped may steer.
    assert!(commands(&call.handle(msg(A, "1"))).is_empty());
    let cmds = commands(&call.handle(msg(B, "1")));
    assert_eq!(var(&cmds, "POPIVR_AGENT"), Some(B));
}

#[test]
fn any_available_resource_makes_the_agent_available() {
    let p = with_presence(profile(), &[A]);
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A]));
    let out = call.handle(presence("alice@example.org/phone", Show::Xa));
    // Heard, but xa does not count under `available`.
    assert!(sent(&out).is_empty());
    let mut p = with_presence(profile(), &[A]);
    p.presence = PresencePolicy::Busy;
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A]));
    assert_eq!(
        to(&call.handle(presence("alice@example.org/phone", Show::Dnd))),
        [A]
    );

    let mut p = with_presence(profile(), &[A]);
    p.presence = PresencePolicy::Away;
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A]));
    call.handle(presence("alice@example.org/phone", Show::Dnd));
    call.handle(presence("alice@example.org/desk", Show::Away));
    // Still waiting for nothing: pop went out with the first presence
    // that decided it? No: the first presence completed the window.
    assert!(call.handle(Input::Timer(TimerId::Presence)).is_empty());
}

/// A silent target (ejabberd says nothing about an offline contact)
/// holds back neither an interactive pop nor, once nobody unheard could
/// rank first, a route; missed notices wait for the window. A target
/// heard available after the first pop gets it then.
#[test]
fn a_silent_target_holds_back_only_what_must_know_everyone() {
    let p = with_presence(profile(), &[A, B]);
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A, B]));
    assert_eq!(
        to(&call.handle(presence("alice@example.org/x", Show::Online))),
        [A]
    );
    assert!(sent(&call.handle(Input::Timer(TimerId::Presence))).is_empty());
    // Bob, heard available after the pop, gets it then, and may answer.
    assert_eq!(
        to(&call.handle(presence("bob@example.org/y", Show::Online))),
        [B]
    );
    let cmds = commands(&call.handle(msg(B, "1")));
    assert_eq!(var(&cmds, "POPIVR_AGENT"), Some(B));

    let mut p = with_presence(profile(), &[A, B]);
    p.mode = Mode::Missed;
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A, B]));
    assert!(sent(&call.handle(presence("alice@example.org/x", Show::Online))).is_empty());
    call.handle(Input::Settled(Duration::from_millis(5)));
    let out = call.handle(Input::Timer(TimerId::Presence));
    assert_eq!(to(&out), [A]);
}

fn nobody_available(out: &[Output]) -> bool {
    out.iter()
        .any(|o| matches!(o, Output::Log(Level::Info, t) if t.contains("nobody available")))
}

/// In a burst of logins the server answers late: a window that ends
/// before it has even handled our presence knows nothing about anyone.
/// (81 of 200 simultaneous per-call pops went to nobody so on prosody.)
#[test]
fn a_busy_server_is_waited_for_before_anyone_counts_as_unavailable() {
    let p = with_presence(profile(), &[A]);
    let (mut call, _) = online_call(p);
    let out = call.handle(Input::Timer(TimerId::Presence));
    assert!(sent(&out).is_empty() && !nobody_available(&out), "{out:?}");
    assert!(commands(&out).is_empty(), "no action: {out:?}");
    call.handle(roster(&[A]));
    assert_eq!(
        to(&call.handle(presence("alice@example.org/x", Show::Online))),
        [A]
    );
}

/// Once a late server has settled, the targets it asks in turn (ejabberd)
/// get as long again as it took; then the silent ones count as away.
#[test]
fn after_a_late_settle_silent_targets_get_as_long_again() {
    let p = with_presence(profile(), &[A, B]);
    let (mut call, _) = online_call(p);
    call.handle(Input::Timer(TimerId::Presence));
    call.handle(roster(&[A, B]));
    let out = call.handle(Input::Settled(Duration::from_secs(3)));
    assert!(
        out.contains(&Output::SetTimer(TimerId::Presence, Duration::from_secs(3))),
        "{out:?}"
    );
    assert!(sent(&out).is_empty());
    assert!(nobody_available(
        &call.handle(Input::Timer(TimerId::Presence))
    ));

    // A server that settled in time changes nothing: the window decides.
    let p = with_presence(profile(), &[A, B]);
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A, B]));
    assert!(commands(&call.handle(Input::Settled(Duration::from_millis(20)))).is_empty());
    assert!(nobody_available(
        &call.handle(Input::Timer(TimerId::Presence))
    ));
}

/// A route over A (priority 5), B (1) and C (0), all subscribed, online,
/// waiting for presence.
fn route_call() -> Call {
    let mut p = with_presence(profile(), &[A, B, C]);
    p.mode = Mode::Route;
    let agents = BTreeMap::from([
        agent(A, &[], Some("2001"), 5),
        agent(B, &[], Some("2002"), 1),
        agent(C, &[], Some("2003"), 0),
    ]);
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]).with_agents(Arc::new(agents));
    call.start();
    call.handle(Input::Timer(TimerId::Setup));
    call.handle(Input::Xmpp(XmppStatus::Online));
    call.handle(roster(&[A, B, C]));
    call
}

#[test]
fn route_mode_routes_without_waiting_for_lower_ranked_silent_agents() {
    let mut call = route_call();
    // Bob is available, but carol (priority 0) is unheard: wait.
    assert!(sent(&call.handle(presence("bob@example.org/y", Show::Chat))).is_empty());
    // Carol is available and nobody unheard ranks before her: route now,
    // without waiting for alice.
    let out = call.handle(presence("carol@example.org/z", Show::Online));
    assert_eq!(to(&out), [C]);
    assert_eq!(var(&commands(&out), "POPIVR_AGENT"), Some(C));
}

#[test]
fn a_target_without_subscription_counts_as_offline_and_is_named() {
    let p = with_presence(profile(), &[A, B]);
    let (mut call, _) = online_call(p);
    let out = call.handle(roster(&[A]));
    assert!(out.iter().any(
        |o| matches!(o, Output::Log(Level::Warn, t) if t.contains(B) && t.contains("subscription"))
    ));
    // A's presence completes the window: B is not subscribed.
    let out = call.handle(presence("alice@example.org/x", Show::Online));
    assert_eq!(to(&out), [A]);
}

#[test]
fn nobody_available_takes_the_default_action_at_once() {
    let p = with_presence(profile(), &[A, B]);
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A, B]));
    call.handle(presence("alice@example.org/x", Show::Away));
    let out = call.handle(presence("bob@example.org", Show::Unavailable));
    assert!(sent(&out).is_empty());
    let cmds = commands(&out);
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("voicemail"));
    assert!(matches!(cmds.last(), Some(Command::Exit(_))));
    assert!(out.iter().any(|o| matches!(o,
        Output::Log(Level::Info, t) if t.contains("nobody available")
            && t.contains("alice@example.org (away)")
            && t.contains("bob@example.org (offline)"))));
}

#[test]
fn nobody_available_can_pop_anyway_or_send_the_missed_notice() {
    let mut p = with_presence(profile(), &[A, B]);
    p.nobody = Nobody::Pop;
    let (mut call, _) = online_call(p);
    // No subscription at all: nothing to wait for.
    let out = call.handle(roster(&[]));
    assert_eq!(to(&out), [A, B]);
    assert!(commands(&out).is_empty(), "the call waits for a reply");

    let mut p = with_presence(profile(), &[A, B]);
    p.nobody = Nobody::Missed;
    let (mut call, _) = online_call(p);
    let out = call.handle(roster(&[]));
    assert_eq!(
        sent(&out),
        [
            (A.to_string(), "Missed call from 5551234".to_string()),
            (B.to_string(), "Missed call from 5551234".to_string())
        ]
    );
    assert_eq!(var(&commands(&out), "POPIVR_ACTION"), Some("voicemail"));
}

#[test]
fn a_team_race_gives_one_action_and_tells_everyone() {
    let (mut call, _) = popped_call();
    let first = call.handle(msg(B, "1"));
    let second = call.handle(msg(A, "2"));
    assert_eq!(
        commands(&first)
            .iter()
            .filter(|c| matches!(c, Command::Exit(_) | Command::Hangup(_)))
            .count(),
        1
    );
    assert_eq!(var(&commands(&first), "POPIVR_AGENT"), Some(B));
    let told = sent(&first);
    assert!(told.contains(&(A.into(), "taken by bob@example.org: sent to desk".into())));
    assert!(told.contains(&(B.into(), "Call from 5551234: sent to desk".into())));
    assert!(commands(&second).is_empty());
    assert_eq!(
        sent(&second),
        [(
            A.into(),
            "This call was already handled: sent to desk.".into()
        )]
    );
}

#[test]
fn a_target_who_comes_online_later_gets_the_pop_too() {
    let p = with_presence(profile(), &[A, B]);
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A, B]));
    call.handle(presence("alice@example.org/x", Show::Online));
    call.handle(presence("bob@example.org", Show::Unavailable));
    let out = call.handle(presence("bob@example.org/phone", Show::Online));
    assert_eq!(to(&out), [B]);
    // And may answer.
    assert_eq!(
        var(&commands(&call.handle(msg(B, "1"))), "POPIVR_AGENT"),
        Some(B)
    );
}

#[test]
fn route_mode_picks_the_first_available_agent_by_priority() {
    let mut call = route_call();
    call.handle(presence("alice@example.org/x", Show::Online));
    call.handle(presence("carol@example.org", Show::Unavailable));
    let out = call.handle(presence("bob@example.org/y", Show::Chat));
    assert_eq!(to(&out), [B], "C has a better priority but is offline");
    let cmds = commands(&out);
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("route"));
    assert_eq!(var(&cmds, "POPIVR_AGENT"), Some(B));
    assert_eq!(var(&cmds, "POPIVR_AGENT_EXTEN"), Some("2002"));
    assert!(matches!(cmds.last(), Some(Command::Exit(_))));
    // A reply afterwards changes nothing.
    assert!(commands(&call.handle(msg(B, "1"))).is_empty());
}

#[test]
fn route_mode_with_nobody_available_takes_the_default_action() {
    let mut p = with_presence(profile(), &[A]);
    p.mode = Mode::Route;
    p.nobody = Nobody::Pop;
    let (mut call, _) = online_call(p);
    call.handle(roster(&[A]));
    let out = call.handle(presence("alice@example.org", Show::Unavailable));
    assert!(
        sent(&out).is_empty(),
        "nobody is routed to an offline agent"
    );
    assert_eq!(var(&commands(&out), "POPIVR_ACTION"), Some("voicemail"));
}

#[test]
fn notify_mode_pops_then_leaves() {
    let mut p = profile();
    p.mode = Mode::Notify;
    let (_, out) = popped_call_with(p);
    let sends = out
        .iter()
        .position(|o| matches!(o, Output::Send(_)))
        .unwrap();
    let exit = out
        .iter()
        .position(|o| matches!(o, Output::Command(Command::Exit(_))))
        .unwrap();
    assert!(sends < exit, "the pop is handed over before E");
    let cmds = commands(&out);
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("notify"));
    assert_eq!(
        var(&cmds, "POPIVR_AGENT"),
        Some("alice@example.org bob@example.org")
    );
}

#[test]
fn a_mode_that_does_not_wait_acts_at_once_when_xmpp_fails() {
    let mut p = profile();
    p.mode = Mode::Notify;
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]);
    call.start();
    let out = call.handle(Input::Xmpp(XmppStatus::Failed("refused".into())));
    assert_eq!(var(&commands(&out), "POPIVR_ACTION"), Some("voicemail"));
}

#[test]
fn missed_mode_plays_nothing_and_sends_the_notice() {
    let mut p = with_presence(profile(), &[A, B]);
    p.mode = Mode::Missed;
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]);
    let start = commands(&call.start());
    assert!(
        start.iter().all(|c| matches!(c, Command::GetVars(_))),
        "{start:?}"
    );
    // Asterisk may report the hangup; the notice must still go out.
    assert!(!call.handle(ev(Event::Hangup)).contains(&Output::Done));
    call.handle(ev(Event::Vars("POPIVR_CALLER_NUM=5551234".into())));
    call.handle(ev(Event::Vars("POPIVR_CALLER_NAME=Doe".into())));
    call.handle(Input::Xmpp(XmppStatus::Online));
    call.handle(roster(&[A, B]));
    call.handle(presence("alice@example.org/x", Show::Online));
    let out = call.handle(presence("bob@example.org/x", Show::Dnd));
    assert_eq!(sent(&out), [(A.into(), "Missed call from 5551234".into())]);
    let cmds = commands(&out);
    assert_eq!(var(&cmds, "POPIVR_ACTION"), Some("missed"));
    assert!(matches!(cmds.last(), Some(Command::Exit(_))));
}

/// Started, variables read, logged in (popped, unless presence decides).
fn popped_call_with(p: Profile) -> (Call, Vec<Output>) {
    let mut call = Call::new(Arc::new(p), "c1".into(), vec![]);
    let mut all = call.start();
    all.extend(call.handle(ev(Event::Vars("POPIVR_CALLER_NUM=5551234".into()))));
    all.extend(call.handle(ev(Event::Vars("POPIVR_CALLER_NAME=Doe%2C%20John".into()))));
    all.extend(call.handle(Input::Xmpp(XmppStatus::Online)));
    (call, all)
}

#[test]
fn the_crm_link_is_appended_encoded_and_attached() {
    let mut p = profile();
    p.url = Some("https://crm.example.org/find?n=$caller$&who=$caller_name$".into());
    let (_, out) = popped_call_with(p);
    let pops: Vec<&OutgoingMessage> = out
        .iter()
        .filter_map(|o| match o {
            Output::Send(m) => Some(m),
            _ => None,
        })
        .collect();
    let link = "https://crm.example.org/find?n=5551234&who=Doe%2C%20John";
    assert_eq!(pops[0].url.as_deref(), Some(link));
    assert!(
        pops[0].body.ends_with(&format!("\n{link}")),
        "{}",
        pops[0].body
    );
}

const ROOM: &str = "sales@conference.example.org";

fn room_profile(allow_jids: &[&str], allow_nicks: &[&str]) -> Profile {
    let mut p = profile();
    p.targets.clear();
    p.room = Some(Room {
        jid: ROOM.into(),
        nick: "popivr".into(),
        allow_jids: allow_jids.iter().map(|j| j.to_string()).collect(),
        allow_nicks: allow_nicks.iter().map(|j| j.to_string()).collect(),
    });
    p
}

fn occupant(nick: &str, real: Option<&str>) -> Input {
    Input::Presence(IncomingPresence {
        from_bare: ROOM.into(),
        from_full: format!("{ROOM}/{nick}"),
        show: Show::Online,
        status: None,
        muc: Some(MucPresence {
            real_jid: real.map(str::to_string),
            is_self: false,
        }),
        sibling: None,
    })
}

fn room_says(nick: &str, body: &str) -> Input {
    message(ROOM, &format!("{ROOM}/{nick}"), MsgKind::Groupchat, body)
}

fn room_msgs(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(m) if m.kind == OutKind::Groupchat && m.to == ROOM => Some(m.body.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_room_pop_waits_for_the_join_and_takes_an_allowed_occupant_reply() {
    let (mut call, out) = popped_call_with(room_profile(&[A], &[]));
    assert!(room_msgs(&out).is_empty(), "not joined yet");
    call.handle(occupant("al", Some(A)));
    call.handle(occupant("mallory", Some("mallory@example.org")));
    let out = call.handle(Input::Joined(ROOM.into(), RealJids::Shown));
    assert_eq!(room_msgs(&out), ["Call from Doe, John <5551234>"]);
    // Our own echo, a stranger and old history never steer.
    assert!(commands(&call.handle(room_says("popivr", "1"))).is_empty());
    assert!(commands(&call.handle(room_says("mallory", "1"))).is_empty());
    let mut old = room_says("al", "1");
    if let Input::Message(m) = &mut old {
        m.delayed = true;
    }
    assert!(commands(&call.handle(old)).is_empty());
    // A one-to-one message from the room's JID is no reply either.
    assert!(commands(&call.handle(msg(ROOM, "1"))).is_empty());
    let out = call.handle(room_says("al", "1"));
    let cmds = commands(&out);
    assert_eq!(var(&cmds, "POPIVR_AGENT"), Some(A));
    assert_eq!(room_msgs(&out), ["Call from 5551234: sent to desk"]);
    let late = call.handle(room_says("al", "2"));
    assert_eq!(
        room_msgs(&late),
        ["al: This call was already handled: sent to desk."]
    );
}

/// Alice and bob got the pop one to one and in the room; alice answers
/// in the room. She is told the outcome, bob that she took the call: she
/// is not told that she herself took it.
#[test]
fn the_agent_who_answered_in_the_room_is_not_told_it_was_taken() {
    let mut p = room_profile(&[A, B], &[]);
    p.targets = vec![A.into(), B.into()];
    let (mut call, _) = popped_call_with(p);
    call.handle(occupant("al", Some(A)));
    call.handle(Input::Joined(ROOM.into(), RealJids::Shown));
    let out = call.handle(room_says("al", "1"));
    assert_eq!(var(&commands(&out), "POPIVR_AGENT"), Some(A));
    let to_alice: Vec<String> = sent(&out)
        .into_iter()
        .filter(|(to, _)| to == A)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(to_alice, ["Call from 5551234: sent to desk"]);
    let to_bob: Vec<String> = sent(&out)
        .into_iter()
        .filter(|(to, _)| to == B)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(to_bob.len(), 1);
    assert!(to_bob[0].contains("taken by"), "{to_bob:?}");
    assert_eq!(room_msgs(&out), ["Call from 5551234: sent to desk"]);
}

#[test]
fn a_room_that_hides_real_jids_is_answered_by_allowed_nicks() {
    let (mut call, _) = popped_call_with(room_profile(&[A], &["desk1"]));
    call.handle(occupant("desk1", None));
    call.handle(occupant("desk2", None));
    let out = call.handle(Input::Joined(ROOM.into(), RealJids::Hidden));
    assert!(
        !out.iter().any(|o| matches!(o, Output::Log(Level::Warn, _))),
        "nicks named on purpose: no warning"
    );
    assert!(commands(&call.handle(room_says("desk2", "1"))).is_empty());
    let out = call.handle(room_says("desk1", "bogus"));
    assert_eq!(room_msgs(&out), ["desk1: Reply 1 or 2"]);
    let cmds = commands(&call.handle(room_says("desk1", "1")));
    assert_eq!(
        var(&cmds, "POPIVR_AGENT"),
        Some("sales@conference.example.org/desk1")
    );
}

/// A room that hides real JIDs (the default for rooms an admin creates on
/// stock ejabberd and prosody) and a `room_allow` of JIDs only: popivr
/// says at once, at warning level, that answers there cannot be checked,
/// and says it again for each answer it ignores (not at debug level).
#[test]
fn a_room_that_hides_real_jids_is_named_at_once_and_at_each_answer() {
    let warnings = |out: &[Output]| -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::Log(Level::Warn, t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    };
    let (mut call, _) = popped_call_with(room_profile(&[A], &[]));
    call.handle(occupant("al", None));
    let out = call.handle(Input::Joined(ROOM.into(), RealJids::Hidden));
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{out:?}");
    assert!(w[0].contains("hides its occupants' real JIDs"), "{w:?}");
    assert!(w[0].contains("anonymous: false"), "{w:?}");
    let out = call.handle(room_says("al", "1"));
    assert!(commands(&out).is_empty());
    let w = warnings(&out);
    assert_eq!(w.len(), 1, "{out:?}");
    assert!(w[0].starts_with("answer from al in "), "{w:?}");
    // A room that shows them: no warning.
    let (mut call, _) = popped_call_with(room_profile(&[A], &[]));
    let out = call.handle(Input::Joined(ROOM.into(), RealJids::Shown));
    assert!(warnings(&out).is_empty());
}

#[test]
fn a_failed_join_leaves_the_room_out() {
    let (mut call, _) = popped_call_with(room_profile(&[A], &[]));
    let out = call.handle(Input::RoomFailed(ROOM.into(), "Forbidden".into()));
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Log(Level::Error, t) if t.contains("Forbidden")))
    );
    // Nobody else to pop: the default action at once.
    assert_eq!(var(&commands(&out), "POPIVR_ACTION"), Some("voicemail"));
}

#[test]
fn every_variable_empty_gives_one_warning_that_names_the_fix() {
    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    call.start();
    let mut all = Vec::new();
    all.extend(call.handle(ev(Event::Vars("POPIVR_CALLER_NUM=".into()))));
    all.extend(call.handle(ev(Event::Vars("POPIVR_CALLER_NAME=".into()))));
    let warnings: Vec<_> = all
        .iter()
        .filter_map(|o| match o {
            Output::Log(Level::Warn, text) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{all:?}");
    assert!(
        warnings[0].contains("MSet line of popivr-calldata.conf"),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains("(POPIVR_CALLER_NAME, POPIVR_CALLER_NUM)"),
        "{warnings:?}"
    );

    let mut call = Call::new(Arc::new(profile()), "c1".into(), vec![]);
    call.start();
    let mut all = call.handle(ev(Event::Vars("POPIVR_CALLER_NUM=5551234".into())));
    all.extend(call.handle(ev(Event::Vars("POPIVR_CALLER_NAME=".into()))));
    assert!(
        !all.iter().any(|o| matches!(o, Output::Log(Level::Warn, _))),
        "one value is enough: {all:?}"
    );
}
