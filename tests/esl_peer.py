"""A FreeSWITCH stand-in for tests: it plays the `socket` application's side of one outbound session the
way the real FreeSWITCH 1.11 did in the captured transcripts (tests/data/esl/*.jsonl).

It connects to our server, answers `connect` with a channel data block built from a captured connect
reply (values %-encoded, Cyrillic included), acknowledges myevents/linger/resume, answers each sendmsg
with `+OK` and then the CHANNEL_EXECUTE / CHANNEL_EXECUTE_COMPLETE pair carrying the same
Application-UUID and the variables the real one carried (digits for play_and_get_digits; the bridge's
originate_disposition/DIALSTATUS/last_bridge_to forms), injects DTMF events, and ends with CHANNEL_HANGUP
... CHANNEL_HANGUP_COMPLETE (Hangup-Cause twice) and a disconnect notice. Writes are split at awkward
places (inside a header, inside a UTF-8 character) and several messages go out in one write, as captured.

What the caller and the agents do is a `Caller` script: keys per digit prompt, a key during the greeting,
who answers each bridge, and where the caller hangs up.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from esl.protocol import Parser, encode_value, parse_headers
from esl.server import EslServer, Handler

DATA = Path(__file__).resolve().parent / "data" / "esl"
CLUECON = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def chunks(name: str) -> list[tuple[str, bytes]]:
    """The captured reads/writes of a transcript, byte-exact: [("in"|"out", bytes)]."""
    with open(DATA / f"{name}.txt.jsonl", encoding="utf-8") as f:
        return [(c["dir"], c["data"].encode("latin-1")) for c in map(json.loads, f)]


def received(name: str) -> list[bytes]:
    """What FreeSWITCH sent, read by read, as captured."""
    return [data for direction, data in chunks(name) if direction == "in"]


def _raw_pairs(block: bytes) -> list[tuple[str, str]]:
    lines = block.decode("ascii").split("\n")
    return [(k, v) for k, _, v in (line.partition(": ") for line in lines if line)]


def _captured() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The connect reply and a DTMF event of the Cyrillic-menu transcript, headers still %-encoded."""
    data = b"".join(received("outbound_cyrillic_menu"))
    connect = data[: data.index(b"\n\n")]
    dtmf_at = data.index(b"Event-Name: DTMF\n")
    dtmf = data[dtmf_at: data.index(b"\n\n", dtmf_at)]
    event = [(k, v) for k, v in _raw_pairs(dtmf) if not k.startswith("DTMF-")]
    return _raw_pairs(connect), event


CONNECT_TEMPLATE, EVENT_TEMPLATE = _captured()


def _captured_channel() -> dict:
    """A row of the captured `show channels as json` (the second listing: two loopback legs, ACTIVE)."""
    bodies = [m.reply_text for m in Parser().feed(b"".join(received("inbound_bgapi_and_failures")))
              if m.content_type == "api/response" and m.reply_text.startswith('{"row_count":2')]
    return json.loads(bodies[0])["rows"][1]


CHANNEL_TEMPLATE = _captured_channel()
# what a vanilla modules.conf.xml loads among the modules we ask about (mod_say_ru and mod_avmd are not)
SOUNDS = "/usr/share/freeswitch/sounds"
VANILLA_MODULES = frozenset({"mod_commands", "mod_dptools", "mod_sndfile", "mod_say_en", "mod_event_socket"})
# applications of optional modules: FreeSWITCH hangs the channel up (DESTINATION_OUT_OF_ORDER) when told
# to run one whose module is not loaded ("Invalid Application", switch_core_session.c)
APP_MODULES = {"avmd_start": "mod_avmd", "avmd_stop": "mod_avmd", "avmd": "mod_avmd"}


@dataclass
class Caller:
    """The caller's and the agents' part. Lists are consumed in order."""

    keys: list[str | None] = field(default_factory=list)  # per play_and_get_digits: digits or silence
    greeting_key: str | None = None  # pressed during the first playback that keys may interrupt
    answers: list[str | None] = field(default_factory=list)  # per bridge: endpoint that answers, or None
    talk_seconds: float = 42.0
    hang_up_on: str | None = None  # the first application of this name finds the caller hanging up
    busy: bool = False  # nobody answers because every agent is busy (USER_BUSY)
    machine: bool = False  # a voicemail answered: its greeting ends in a beep that mod_avmd hears
    on_a_call: set[str] = field(default_factory=set)  # agents with an answered call (show channels)
    ringing: set[str] = field(default_factory=set)  # agents whose phone rings for someone else


@dataclass
class Bridge:
    """One bridge as FreeSWITCH received it."""

    data: str
    legs: list[tuple[str, str]]  # (origination_uuid, endpoint dial string)
    separator: str  # "," ring all, "|" one after another
    call_timeout: str | None  # the channel variable when the bridge started
    braces: str


class FsPeer:
    def __init__(
        self,
        port: int,
        caller: Caller | None = None,
        *,
        number: str = "79161234567",
        name: str = "Иван Петров",
        destination: str = "100",
        variables: dict[str, str] | None = None,
        uuid: str | None = None,
        split: bool = True,
        host: str = "127.0.0.1",
        modules: frozenset[str] | set[str] = VANILLA_MODULES,
        sounds: frozenset[str] | set[str] = frozenset({"ru", "en"}),
    ) -> None:
        self.host, self.port = host, port
        self.caller = caller or Caller()
        self.uuid = uuid or str(uuidlib.uuid4())
        self.number, self.name, self.destination = number, name, destination
        self.channel_name = f"sofia/internal/{number}@192.0.2.10" if number else "loopback/9998-b"
        self.vars: dict[str, str] = {"shopcall_flow": "inbound", "shopcall_number": destination}
        self.vars.update(variables or {})
        self.split = split
        self.commands: list[str] = []  # first line of every command we received
        self.apps: list[tuple[str, str]] = []  # (application, argument) as executed
        self.bridges: list[Bridge] = []
        self.hung_up = False
        self.hangup_cause = ""
        self.linger: int | None = None
        self.late_replies = 0  # "+OK" sent to commands that arrived after the hangup (linger)
        self.answered = False
        self.modules = set(modules)
        self.sounds = set(sounds)  # languages whose sound pack is installed (say needs its files)
        self.said: list[str] = []  # say arguments a loaded mod_say_* spoke
        self.avmd = False  # mod_avmd's media bug is on the channel
        self.subscribed: list[str] = []  # what `event plain ...` added to myevents
        self.nixed: list[str] = []  # what `nixevent ...` took away
        self._seq = 1000
        self._writer: asyncio.StreamWriter | None = None

    # -- wire -------------------------------------------------------------------------------------

    async def _write(self, *messages: bytes) -> None:
        """Send messages in one write, or split at an awkward offset (inside a header / a character)."""
        assert self._writer is not None
        data = b"".join(messages)
        if self._writer.is_closing():
            return
        if self.split and len(data) > 100:
            cut = len(data) // 2 + 1
            for piece in (data[:cut], data[cut:]):
                self._writer.write(piece)
                await self._writer.drain()
                await asyncio.sleep(0.002)
        else:
            self._writer.write(data)
            await self._writer.drain()

    @staticmethod
    def reply(text: str) -> bytes:
        return f"Content-Type: command/reply\nReply-Text: {text}\n\n".encode()

    @staticmethod
    def api_response(body: str) -> bytes:
        raw = body.encode("utf-8")
        return b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(raw), raw)

    def notice(self, disposition: str) -> bytes:
        head = f"Content-Type: text/disconnect-notice\nControlled-Session-UUID: {self.uuid}\n"
        if disposition == "linger":
            head += f"Content-Disposition: linger\nChannel-Name: {self.channel_name}\n"
            return (head + f"Linger-Time: {self.linger}\nContent-Length: 0\n\n").encode()
        return (head + f"Content-Disposition: disconnect\nContent-Length: {len(CLUECON)}\n\n").encode() + CLUECON

    def _channel_values(self) -> dict[str, str]:
        # sofia keeps a SIP display name as it came between the quotes, escapes and all
        name = self.name.replace("\\", "\\\\").replace('"', '\\"') if self.channel_name.startswith("sofia/") \
            else self.name
        return {
            "Unique-ID": self.uuid, "Channel-Call-UUID": self.uuid, "Caller-Unique-ID": self.uuid,
            "Channel-Unique-ID": self.uuid, "Channel-Name": self.channel_name,
            "Caller-Channel-Name": self.channel_name, "Channel-Channel-Name": self.channel_name,
            "Caller-Caller-ID-Number": self.number, "Caller-Orig-Caller-ID-Number": self.number,
            "Channel-Caller-ID-Number": self.number, "Channel-Orig-Caller-ID-Number": self.number,
            "Caller-ANI": self.number, "Channel-ANI": self.number,
            "Caller-Caller-ID-Name": name, "Caller-Orig-Caller-ID-Name": name,
            "Channel-Caller-ID-Name": name, "Channel-Orig-Caller-ID-Name": name,
            "Caller-Destination-Number": self.destination, "Channel-Destination-Number": self.destination,
            "Event-Date-Timestamp": str(int(time.time() * 1e6)),
        }

    def _fill(self, template: list[tuple[str, str]], values: dict[str, str]) -> list[tuple[str, str]]:
        out = []
        for key, raw in template:
            if key in values:
                if values[key] == "" and "Caller-ID-Name" in key:
                    continue  # FreeSWITCH leaves the header out when there is no name
                out.append((key, encode_value(values[key])))
            else:
                out.append((key, raw))
        return out

    def connect_reply(self) -> bytes:
        pairs = self._fill(CONNECT_TEMPLATE, self._channel_values())
        at = next(i for i, (k, _) in enumerate(pairs) if k == "variable_current_application_data")
        extra = [(f"variable_{k}", encode_value(v)) for k, v in self.vars.items()]
        pairs = pairs[:at] + extra + pairs[at:]
        return "".join(f"{k}: {v}\n" for k, v in pairs).encode("ascii") + b"\n"

    def event(self, name: str, *, tail: dict[str, str] | None = None, variables: bool = True,
              head: dict[str, str] | None = None, values: dict[str, str] | None = None) -> bytes:
        """One text/event-plain message in the captured layout and %-encoding: the channel block, then
        `head` (Other-Leg-*), the channel variables, then `tail` (Application-*, DTMF-*)."""
        self._seq += 1
        values = self._channel_values() | {"Event-Name": name, "Event-Sequence": str(self._seq)} | (values or {})
        if self.hung_up:
            values["Answer-State"] = "hangup"
        pairs = self._fill(EVENT_TEMPLATE, values)
        if self.hung_up and name != "DTMF":
            at = next(i for i, (k, _) in enumerate(pairs) if k == "Answer-State") + 1
            pairs.insert(at, ("Hangup-Cause", self.hangup_cause))
            if name == "CHANNEL_HANGUP_COMPLETE":  # captured: Hangup-Cause appears twice
                pairs.insert(13, ("Hangup-Cause", self.hangup_cause))
        for key, value in (head or {}).items():
            pairs.append((key, encode_value(value)))
        if variables:
            pairs += [(f"variable_{k}", encode_value(v)) for k, v in self.vars.items()]
        pairs += [(k, encode_value(v)) for k, v in (tail or {}).items()]
        body = "".join(f"{k}: {v}\n" for k, v in pairs).encode("ascii") + b"\n"
        return b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(body), body)

    # -- the session ------------------------------------------------------------------------------

    async def run(self) -> None:
        reader, self._writer = await asyncio.open_connection(self.host, self.port)
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\n\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # our server closed the socket
                lines = raw.decode("utf-8").strip("\n").split("\n")
                self.commands.append(lines[0])
                await self._command(lines[0], parse_headers("\n".join(lines[1:]).encode(), decode=False))
                if self._writer.is_closing():
                    return
        finally:
            self._writer.close()

    async def _command(self, line: str, headers: dict[str, str]) -> None:
        word, _, rest = line.partition(" ")
        if self.hung_up and self.linger is None:
            # no linger: FreeSWITCH already closed; a late command gets no reply (captured)
            return
        if word == "connect":
            await self._write(self.connect_reply())
        elif word == "myevents":
            await self._write(self.reply("+OK Events Enabled"))
        elif word == "linger":
            self.linger = int(rest) if rest else -1
            await self._write(self.reply(f"+OK will linger {rest} seconds" if rest else "+OK will linger"))
        elif word == "resume":
            await self._write(self.reply("+OK"))
        elif word == "nixevent":
            self.nixed += rest.split(" ")
            await self._write(self.reply("+OK events disabled"))
        elif word == "event":
            self.subscribed += rest.split(" ")[1:]
            await self._write(self.reply("+OK event listener enabled plain"))
        elif word == "exit":
            await self._write(self.reply("+OK bye"), self.notice("disconnect"))
            self._writer.close()
        elif word == "api":
            await self._write(self.api_response(self._api(rest)))
        elif word == "sendmsg":
            if self.hung_up:
                self.late_replies += 1
                await self._write(self.reply("+OK"))  # lingering: "+OK" and nothing happens (captured)
                return
            await self._sendmsg(headers)
        else:
            await self._write(self.reply("-ERR command not found"))

    def _api(self, rest: str) -> str:
        words = rest.split(" ")
        if words[0] == "uuid_getvar" and len(words) == 3:
            if words[1] != self.uuid or self.hung_up:
                return "-ERR No such channel!\n"
            if words[2] == "caller_id_name":
                return self.name or "_undef_"
            return self.vars.get(words[2], "_undef_")  # raw UTF-8, no trailing newline (captured)
        if rest == "show channels as json":
            return self.show_channels()
        if words[0] == "module_exists" and len(words) == 2:
            return "true" if words[1] in self.modules else "false"  # no newline (mod_commands)
        if words[:2] == ["xml_locate", "languages"] and len(words) == 5 and words[4] in ("ru", "en"):
            # what vanilla's lang/<ln>/<ln>.xml holds, the pre-processor's $${sounds_dir} expanded
            return f'<language name="{words[4]}" sound-prefix="{SOUNDS}/{words[4]}">\n</language>\n'
        if words[0] == "xml_locate":
            return "can't find anything\n"
        if words[0] == "file_exists" and len(words) == 2:
            lang = words[1][len(SOUNDS) + 1:].split("/", 1)[0] if words[1].startswith(SOUNDS + "/") else ""
            return "true" if lang in self.sounds and words[1].endswith("/digits/1.wav") else "false"
        return f"-ERR {words[0]} Command not found!\n"

    def show_channels(self) -> str:
        """This call's channel and a leg of every agent on a call or ringing, as FreeSWITCH lists them:
        a user rung through the directory carries presence_id USER@DOMAIN, a phone's own call its contact."""
        rows = [{**CHANNEL_TEMPLATE, "uuid": self.uuid, "name": self.channel_name, "cid_num": self.number,
                 "callstate": "ACTIVE"}]
        for n, agent in enumerate(sorted(self.caller.on_a_call | self.caller.ringing)):
            state = "ACTIVE" if agent in self.caller.on_a_call else "RINGING"
            rows.append({**CHANNEL_TEMPLATE, "uuid": str(uuidlib.uuid4()), "direction": "outbound",
                         "name": f"sofia/internal/sip:{agent}@192.0.2.{20 + n}:5060",
                         "presence_id": f"{agent}@192.0.2.2", "callstate": state, "application": ""})
        return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":"))

    async def _sendmsg(self, headers: dict[str, str]) -> None:
        command = headers.get("call-command")
        if command == "hangup":
            await self._write(self.reply("+OK"))
            await self._hangup(headers.get("hangup-cause", "NORMAL_CLEARING"))
            return
        if command != "execute":
            await self._write(self.reply("-ERR invalid command"))
            return
        app, arg = headers.get("execute-app-name", ""), headers.get("execute-app-arg", "")
        app_uuid = headers.get("Event-UUID") or str(uuidlib.uuid4())
        self.apps.append((app, arg))
        await self._write(self.reply("+OK"))
        await asyncio.sleep(0)
        if app in APP_MODULES and APP_MODULES[app] not in self.modules:
            await self._hangup("DESTINATION_OUT_OF_ORDER")  # no CHANNEL_EXECUTE: it never started
            return
        started = {"Application": app, "Application-Data": arg, "Application-UUID": app_uuid}
        await self._write(self.event("CHANNEL_EXECUTE", tail=started))
        if self.caller.hang_up_on == app:
            self.caller.hang_up_on = None
            await self._hangup("NORMAL_CLEARING", running=(app, arg, app_uuid))
            return
        handler = getattr(self, f"_app_{app}", None)
        self._complete: dict[str, dict[str, str]] = {}
        self._kill: str | None = None
        before, response = handler(arg) if handler else ([], "_none_")
        if self._kill:  # captured: the failed bridge hangs up the socket's own channel, HANGUP first
            await self._hangup(self._kill, running=(app, arg, app_uuid), caller_left=False)
            return
        done = {"Application": app, "Application-Data": arg, "Application-Response": response,
                "Application-UUID": app_uuid}
        # captured: the DTMF and the EXECUTE_COMPLETE it caused came in one read
        await self._write(*before, self.event("CHANNEL_EXECUTE_COMPLETE", tail=done, **self._complete))

    def _dtmf(self, digit: str) -> bytes:
        return self.event("DTMF", variables=False,
                          tail={"DTMF-Digit": digit, "DTMF-Duration": "2000", "DTMF-Source": "UNKNOWN"})

    # each returns (messages before the EXECUTE_COMPLETE, its Application-Response)

    def _app_answer(self, arg: str):
        self.answered = True
        return [self.event("CHANNEL_ANSWER")], "_none_"

    def _app_multiset(self, arg: str):
        delimiter, rest = (arg[2], arg[3:]) if arg.startswith("^^") else (" ", arg)
        for pair in rest.split(delimiter):
            # as FreeSWITCH's argument splitting does (seen on 1.10): quotes group, and are dropped
            self._app_set(pair.replace("'", "").replace('"', ""))
        return [], "_none_"

    def _app_set(self, arg: str):
        name, _, value = arg.partition("=")
        if value:
            self.vars[name] = value
        else:
            self.vars.pop(name, None)
        return [], "_none_"

    def _app_playback(self, arg: str):
        interrupted = self._terminated()
        self.vars.update(playback_ms="640" if interrupted else "2000",
                         playback_samples="5120" if interrupted else "16000")
        return interrupted, "FILE PLAYED"

    def _terminated(self) -> list[bytes]:
        """The caller's greeting key, if a key of playback_terminators (default "*") ends what plays."""
        self.vars.pop("playback_terminator_used", None)
        terminators = self.vars.get("playback_terminators", "*")
        key = self.caller.greeting_key
        if key and terminators != "none" and key in terminators:
            self.caller.greeting_key = None
            self.vars["playback_terminator_used"] = key
            return [self._dtmf(key)]
        return []

    def _app_say(self, arg: str):
        # mod_dptools: `<module>[:<lang>] <type> <method> [<gender>] <text>`, 4 or 5 words; a module that
        # is not loaded logs "Invalid SAY Interface" and says nothing
        words = arg.split(" ")
        if len(words) in (4, 5) and f"mod_say_{words[0].split(':')[0]}" in self.modules:
            self.said.append(arg)
        return self._terminated(), "_none_"

    def _app_play_and_get_digits(self, arg: str):
        parts = arg.split(" ")
        var = parts[7]
        digits = self.caller.keys.pop(0) if self.caller.keys else None
        if digits:
            self.vars.update({"read_result": "success", var: digits})
            return [self._dtmf(d) for d in digits], "_none_"
        self.vars["read_result"] = "failure"
        self.vars.pop(var, None)
        return [], "_none_"

    def _app_bridge(self, arg: str):
        braces, _, rest = arg.partition("}") if arg.startswith("{") else ("", "", arg)
        separator = "|" if "|" in rest else ","
        legs = []
        # as FreeSWITCH does: a separator inside a leg's [...] variables does not split legs
        for leg in re.split(r"\|(?![^\[]*\])" if separator == "|" else r",(?![^\[]*\])", rest):
            leg_vars, _, target = leg[1:].partition("]") if leg.startswith("[") else ("", "", leg)
            opts = dict(p.split("=", 1) for p in leg_vars.split(",") if "=" in p)
            legs.append((opts.get("origination_uuid", str(uuidlib.uuid4())), target))
        self.bridges.append(Bridge(arg, legs, separator, self.vars.get("call_timeout"), braces + "}"))
        answering = self.caller.answers.pop(0) if self.caller.answers else None
        for key in ("last_bridge_to", "bridge_uuid", "bridge_channel", "bridge_hangup_cause"):
            self.vars.pop(key, None)
        leg_uuids = "|:".join(f"{u};Outbound Call;{t.rsplit('/', 1)[-1]}" for u, t in legs)
        self.vars["originated_legs"] = f"ARRAY::{leg_uuids}"
        match = next(((u, t) for u, t in legs if t.rsplit("/", 1)[-1] == answering), None)
        if match:
            now = int(time.time() * 1e6)
            self.vars.update(originate_disposition="SUCCESS", DIALSTATUS="SUCCESS", last_bridge_to=match[0],
                             bridge_uuid=match[0], bridge_channel=f"{match[1]}-a",
                             bridge_hangup_cause="NORMAL_CLEARING", last_bridge_hangup_cause="NORMAL_CLEARING")
            self._complete = {
                "values": {"Caller-Channel-Bridged-Time": str(now - int(self.caller.talk_seconds * 1e6))},
                "head": {"Other-Type": "originatee", "Other-Leg-Unique-ID": match[0],
                         "Other-Leg-Destination-Number": answering or "", "Other-Leg-Channel-Name": f"{match[1]}-a"},
            }
            bridge = self.event("CHANNEL_BRIDGE", head={"Bridge-A-Unique-ID": self.uuid,
                                                        "Bridge-B-Unique-ID": match[0]})
            return [bridge, self.event("CHANNEL_UNBRIDGE")], "_none_"
        cause = "USER_BUSY" if self.caller.busy else "NO_ANSWER"
        if "leg_timeout=" in arg:
            cause = "ALLOTTED_TIMEOUT"
            if self.vars.get("continue_on_fail") != "true":
                self._kill = cause  # captured: without continue_on_fail this kills our channel
        dialstatus = {"NO_ANSWER": "NOANSWER", "USER_BUSY": "BUSY"}.get(cause, cause)  # captured spellings
        self.vars.update(originate_disposition=cause, DIALSTATUS=dialstatus, originate_failed_cause=cause, last_bridge_hangup_cause=cause,
                         originate_causes="ARRAY::" + "|:".join(f"{u};{cause}" for u, _ in legs))
        return [], "_none_"

    # mod_avmd (only when loaded, see APP_MODULES) and mod_dptools' wait_for_silence

    def _app_avmd_start(self, arg: str):
        self.avmd = True
        return [], "_none_"

    def _app_avmd_stop(self, arg: str):
        self.avmd = False
        return [], "_none_"

    def _app_wait_for_silence(self, arg: str):
        if not (self.avmd and self.caller.machine):
            return [], "_none_"
        # mod_avmd sets avmd_detect before it fires avmd::beep (mod_avmd.c); the event reaches a socket
        # only when it subscribed to it (`event plain CUSTOM avmd::beep`): myevents has no CUSTOM
        self.vars["avmd_detect"] = "TRUE"
        if "avmd::beep" not in self.subscribed:
            return [], "_none_"
        beep = {"Beep-Status": "DETECTED", "Frequency": "1002.345678", "Frequency-variance": "0.000012",
                "Amplitude": "2803.611206", "Amplitude-variance": "11.402841", "Detection-time": "112000"}
        return [self.custom_event("avmd::beep", beep)], "_none_"

    def custom_event(self, subclass: str, headers: dict[str, str]) -> bytes:
        """A CUSTOM event as switch_event_create_subclass builds it: the core headers, Event-Subclass, then
        the module's own (mod_avmd adds Unique-ID and Call-command; no channel data)."""
        self._seq += 1
        core = EVENT_TEMPLATE[: next(i for i, (k, _) in enumerate(EVENT_TEMPLATE) if k == "Event-Sequence") + 1]
        values = {"Event-Name": "CUSTOM", "Event-Sequence": str(self._seq), "Event-Calling-File": "mod_avmd.c",
                  "Event-Calling-Function": "avmd_fire_event", "Event-Date-Timestamp": str(int(time.time() * 1e6))}
        own = {"Event-Subclass": subclass, "Unique-ID": self.uuid, "Call-command": "avmd"} | headers
        pairs = self._fill(core, values) + [(k, encode_value(v)) for k, v in own.items()]
        body = "".join(f"{k}: {v}\n" for k, v in pairs).encode("ascii") + b"\n"
        return b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(body), body)

    def _app_record(self, arg: str):
        self.vars.update(record_ms="1000", record_seconds="1", record_samples="8000",
                         silence_hits_exhausted="false")
        return [], "_none_"

    # -- hangup -------------------------------------------------------------------------------------

    async def _hangup(self, cause: str, running: tuple[str, str, str] | None = None, *,
                      caller_left: bool = True) -> None:
        self.hung_up, self.hangup_cause = True, cause
        out = [self.event("CHANNEL_HANGUP")]
        if running:  # captured: CHANNEL_HANGUP first, then the running application's completion
            app, arg, app_uuid = running
            response = {"playback": "PLAYBACK ERROR"}.get(app, "_none_")
            if app == "bridge" and caller_left:
                self.vars.update(originate_disposition="ORIGINATOR_CANCEL", DIALSTATUS="CANCEL")
            if app == "play_and_get_digits":
                self.vars["read_result"] = "failure"
            if app == "playback":
                self.vars.update(playback_ms="2048", playback_samples="16384")
            out.append(self.event("CHANNEL_EXECUTE_COMPLETE", tail={
                "Application": app, "Application-Data": arg, "Application-Response": response,
                "Application-UUID": app_uuid}))
        socket_app = {"Application": "socket", "Application-Data": f"127.0.0.1:{self.port} async full",
                      "Application-Response": "_none_", "Application-UUID": str(uuidlib.uuid4())}
        out += [self.event("CHANNEL_UNPARK"), self.event("CHANNEL_EXECUTE_COMPLETE", tail=socket_app),
                self.event("CHANNEL_STATE", variables=False), self.event("CHANNEL_STATE", variables=False),
                self.event("CHANNEL_HANGUP_COMPLETE")]
        if self.linger is None:
            await self._write(*out, self.notice("disconnect"))
            assert self._writer is not None
            self._writer.close()
        else:
            await self._write(*out, self.notice("linger"))



async def call_once(routes: Mapping[str, Handler], caller: Caller | None = None, *, command_timeout: float = 3.0,
                    timeout: float = 15.0, **peer) -> FsPeer:
    """One call from the peer (`peer` are FsPeer's keywords) to our outbound-socket server serving
    `routes`, started for it and stopped after the session has ended on both sides."""
    server = EslServer(routes, port=0, command_timeout=command_timeout)
    await server.start()
    fs = FsPeer(server.port, caller, **peer)
    try:
        await asyncio.wait_for(fs.run(), timeout)
        await asyncio.wait_for(asyncio.gather(*server.active), 5)
    finally:
        await server.stop()
    return fs


# -- replaying a captured transcript byte for byte -------------------------------------------------------


def command_key(command: bytes) -> str:
    """What identifies a command across runs: the verb (plus the app for sendmsg, the API for api)."""
    lines = command.decode("utf-8", "replace").strip("\n").split("\n")
    words = lines[0].split(" ")
    if words[0] == "sendmsg":
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return "sendmsg " + headers.get("execute-app-name", headers.get("call-command", ""))
    if words[0] in ("api", "bgapi", "event") and len(words) > 1:
        return f"{words[0]} {words[1]}"
    return words[0]


@dataclass
class _Group:
    key: str
    command: bytes
    answers: list[bytes]
    used: bool = False


class Replay:
    """FreeSWITCH's side of a captured transcript, replayed byte for byte in its captured read chunks.

    Each command we receive is matched (by `command_key`) with the next unused captured command of the
    same kind, and the chunks FreeSWITCH sent after that one are sent back; the application uuid that
    FreeSWITCH reported is swapped for the Event-UUID we chose (same length, so every Content-Length
    stays right). A command the transcript does not have gets a plain `+OK`.
    """

    def __init__(self, name: str, *, gap: float = 0.003) -> None:
        self.name = name
        self.gap = gap
        self.greeting: list[bytes] = []
        self.groups: list[_Group] = []
        for direction, data in chunks(name):
            if direction == "out":
                self.groups.append(_Group(command_key(data), data, []))
            elif self.groups:
                self.groups[-1].answers.append(data)
            else:
                self.greeting.append(data)
        self.received: list[bytes] = []
        self.writer: asyncio.StreamWriter | None = None
        self._sending = asyncio.Lock()  # one group at a time: interleaving would corrupt the framing

    async def _send(self, data: list[bytes]) -> None:
        assert self.writer is not None
        async with self._sending:
            for piece in data:
                if self.writer.is_closing():
                    return
                self.writer.write(piece)
                await self.writer.drain()
                await asyncio.sleep(self.gap)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        try:
            await self._send(self.greeting)
            while not writer.is_closing():
                try:
                    command = await reader.readuntil(b"\n\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.received.append(command)
                await self._send(self._answer(command))
        finally:
            writer.close()

    def _answer(self, command: bytes) -> list[bytes]:
        key = command_key(command)
        group = next((g for g in self.groups if not g.used and g.key == key), None)
        if group is None:
            return [FsPeer.reply("+OK")]
        group.used = True
        answers = group.answers
        ours = _header(command, "Event-UUID")
        if ours and key.startswith("sendmsg "):
            theirs = _application_uuid(b"".join(answers), key[8:])
            if theirs:
                answers = [a.replace(theirs.encode(), ours.encode()) for a in answers]
        return answers

    async def send_unclaimed(self) -> None:
        """Send what FreeSWITCH answered to captured commands we never sent (late commands)."""
        last = max((i for i, g in enumerate(self.groups) if g.used), default=-1)
        rest = [a for g in self.groups[last + 1:] for a in g.answers]
        for group in self.groups[last + 1:]:
            group.used = True
        await self._send(rest)

    async def connect_to(self, port: int, host: str = "127.0.0.1") -> None:
        """Outbound transcripts: FreeSWITCH is the one that connects."""
        reader, writer = await asyncio.open_connection(host, port)
        await self.serve(reader, writer)


def _header(command: bytes, name: str) -> str:
    for line in command.decode("utf-8", "replace").split("\n"):
        key, _, value = line.partition(": ")
        if key == name:
            return value
    return ""


def _application_uuid(data: bytes, app: str) -> str:
    for msg in Parser().feed(data):
        if msg.is_event:
            ev = msg.event()
            if ev.name == "CHANNEL_EXECUTE" and ev.get("Application") == app:
                return ev.get("Application-UUID")
    return ""
