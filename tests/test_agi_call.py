"""agi.call.AgiCall's own choices of command, against a fake session that records what would be sent."""

from __future__ import annotations

from agi.call import AgiCall
from shopcall.call import CallInfo, DialStatus
from tests.scripted import PromptNames
from tests.test_callbacks import FakeSession


def make_call() -> tuple[AgiCall, FakeSession]:
    session = FakeSession("ANSWER")
    return AgiCall(session, CallInfo(uniqueid="1.1", pbx="asterisk"), PromptNames()), session  # type: ignore[arg-type]


async def test_plain_variables_go_in_one_mset():
    call, session = make_call()
    await call.set_vars({"SHOPCALL_DONE": "1", "SHOPCALL_OUTCOME": "missed_no_answer"})
    assert session.sent == ['EXEC MSet "SHOPCALL_DONE=1,SHOPCALL_OUTCOME=missed_no_answer"']


async def test_values_mset_could_read_differently_go_one_by_one():
    # a comma would start another pair, a quote or ${...} would be read by Asterisk, a function is not a name
    for values in ({"A": "1", "B": "x,C=2"}, {"A": "1", "B": 'say "hi"'}, {"A": "1", "B": "${EXTEN}"},
                   {"A": "1", "CALLERID(name)": "Ann"}, {"A": "1", "B": "Анна"}):
        call, session = make_call()
        await call.set_vars(values)
        assert [line.split(" ", 3)[:3] for line in session.sent] == [["SET", "VARIABLE", n] for n in values]


async def test_a_single_variable_is_a_set_variable():
    call, session = make_call()
    await call.set_vars({"SHOPCALL_DONE": "0"})
    assert session.sent == ['SET VARIABLE SHOPCALL_DONE "0"']


async def test_answer_then_prompts_nobody_can_interrupt_is_one_playback_that_answers():
    call, session = make_call()
    await call.answer()
    await call.play("greeting", "recording_notice")
    assert session.sent == ['EXEC Playback "/sounds/ru/greeting&/sounds/ru/recording_notice"']
    await call.answer()  # already answered by Playback: nothing more is sent
    await call.play("connecting")
    assert session.sent[1:] == ['EXEC Playback "/sounds/ru/connecting"']


async def test_an_answer_is_sent_before_any_other_command():
    for act, first in ((lambda c: c.play("main_menu", interruptible=True), "STREAM FILE"),
                       (lambda c: c.set_var("X", "1"), "SET VARIABLE"),
                       (lambda c: c.get_var("DIALSTATUS"), "GET VARIABLE"),
                       (lambda c: c.collect(None, max_digits=1, timeout=1), "WAIT FOR DIGIT")):
        call, session = make_call()
        await call.answer()
        await act(call)
        assert session.sent[0] == "ANSWER" and session.sent[1].startswith(first), session.sent


async def test_a_call_hung_up_before_any_prompt_is_not_answered_first():
    call, session = make_call()
    await call.answer()
    await call.hangup("busy")
    assert session.sent == ["EXEC Hangup 17"]


async def test_a_path_playback_would_split_or_read_as_options_is_streamed_file_by_file():
    from pathlib import Path

    for odd in ("/tts/ru/1&2", "/tts/ru/a,b", "/tts/ru/say (hi)", '/tts/ru/"q"'):
        call, session = make_call()
        await call.answer()
        await call.play(Path("/sounds/ru/greeting"), Path(odd))
        assert session.sent[0] == "ANSWER", session.sent
        assert [line.split(" ", 2)[:2] for line in session.sent[1:]] == [["STREAM", "FILE"]] * 2


async def test_last_dial_reads_the_dialplans_own_dial_in_one_command():
    cases = [  # DIALSTATUS, DIALEDPEERNAME, ANSWEREDTIME -> status, endpoint, talk seconds
        (("ANSWER", "PJSIP/agent1-0000000a", "12"), (DialStatus.ANSWERED, "agent1", 12.0)),
        (("ANSWER", "PJSIP/agent-two-0000000b", "3.5"), (DialStatus.ANSWERED, "agent-two", 3.5)),
        (("NOANSWER", "", ""), (DialStatus.NOANSWER, None, 0.0)),
        (("CANCEL", "", ""), (DialStatus.CALLER_GONE, None, 0.0)),
        (("CHANUNAVAIL", "", ""), (DialStatus.FAILED, None, 0.0)),
        (("", "", ""), (DialStatus.FAILED, None, 0.0)),  # no Dial ran
        # not our template, or not a name our dial strings allow: no endpoint is guessed
        (("ANSWER", "SIP/agent1-0000000c", "4"), (DialStatus.ANSWERED, None, 4.0)),
        (("ANSWER", "PJSIP/a;b-0000000d", "4"), (DialStatus.ANSWERED, None, 4.0)),
    ]
    for (status, peer, answered), expected in cases:
        call, session = make_call()
        session.vars.update(DIALSTATUS=status, DIALEDPEERNAME=peer, ANSWEREDTIME=answered)
        result = await call.last_dial()
        assert (result.status, result.answered_endpoint, result.talk_seconds) == expected, (status, peer)
        assert result.detail == status
        assert session.sent == ['GET FULL VARIABLE "${DIALSTATUS}|${DIALEDPEERNAME}|${ANSWEREDTIME}|'
                                '${SHARED(SHOPCALL_ANSWERED_AT)}|${STRFTIME(,,%s.%3q)}"']


def routine_call(channel: str = "PJSIP/trunk-00000001") -> tuple[AgiCall, FakeSession]:
    session = FakeSession("ANSWER")
    info = CallInfo(uniqueid="1.1", pbx="asterisk", channel=channel)
    return AgiCall(session, info, PromptNames(), answered_routine="shopcall-answered"), session  # type: ignore[arg-type]


async def test_talk_time_counts_from_the_agents_answer_not_the_callers():
    # Asterisk's ANSWEREDTIME (40 s) counts from when the caller was answered, greeting and ringing
    # included; the include's routine noted the agent's answer 12.25 s before the Dial returned
    call, session = routine_call()
    session.vars.update({"DIALEDPEERNAME": "PJSIP/agent2-00000007", "ANSWEREDTIME": "40",
                         "SHARED(SHOPCALL_ANSWERED_AT)": "1796300000.500", "STRFTIME(,,%s.%3q)": "1796300012.750"})
    result = await call.dial(["agent2", "agent3"], timeout=20)
    assert session.sent[0] == 'EXEC Dial "PJSIP/agent2&PJSIP/agent3,20,gU(shopcall-answered^PJSIP/trunk-00000001)"'
    assert (result.status, result.answered_endpoint, result.talk_seconds) == (DialStatus.ANSWERED, "agent2", 12.25)
    # no note from the routine (nobody answered through it): Asterisk's figure is all there is
    session.vars["SHARED(SHOPCALL_ANSWERED_AT)"] = ""
    assert (await call.dial(["agent2"], timeout=20)).talk_seconds == 40.0


async def test_without_the_routine_or_with_an_odd_channel_name_the_dial_has_no_option_u():
    for call, session in (make_call(), routine_call("PJSIP/x)^y-0001"), routine_call("")):
        await call.dial(["agent2"], timeout=20)
        assert session.sent[0] == 'EXEC Dial "PJSIP/agent2,20,g"'
