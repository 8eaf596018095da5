"""agi.call.AgiCall's own choices of command, against a fake session that records what would be sent."""

from __future__ import annotations

from agi.call import AgiCall
from shopcall.call import CallInfo
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
