#!/usr/bin/env python3
"""COMPARISON PEER for the benchmarks -- not part of popivr.

What an Asterisk admin would write instead of popivr: a small ExternalIVR
child in Python with slixmpp that does the same pop-and-wait as popivr's
interactive profile in the bench:

  1. hold audio at once (S, then A), keep the playlist going on F;
  2. read the caller's data with one G per variable;
  3. log in (STARTTLS, certificate checked against the CA file, SASL);
  4. with ``presence = available``: fetch the roster, wait up to
     ``presence_wait`` for the target's presence, pop only if the target is
     online (as popivr's default does); with ``presence = any``: pop as
     soon as the session is up;
  5. wait for the target's reply ("1"/"desk" or "h"), then V + E (or H),
     confirm to the agent; a caller key 0 goes to the operator;
  6. on stdin EOF: a missed-call notice if the pop was out and nobody
     answered, then leave.

It is written the way such a script is usually written (slixmpp's own
client, imports at the top, no tuning) and kept honest rather than
hardened: no escaping of V values, no line-length rules, no reconnects.

Run by the bench (benches/suite) as ``python slixmpp_pop.py n=N``, with
``POPIVR_PEER_CONFIG`` naming an INI file (section [peer]: jid, password,
host, port, ca_file, target, presence, presence_wait, timeout). The
password is never on the command line.
"""

import asyncio
import configparser
import os
import sys

import slixmpp

VARIABLES = ["POPIVR_CALLER_NUM", "POPIVR_CALLER_NAME", "POPIVR_EXTEN", "POPIVR_DNID", "POPIVR_UNIQUEID"]
HOLD = ["moh/a", "moh/b"]


def command(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Pop(slixmpp.ClientXMPP):
    def __init__(self, conf, call):
        super().__init__(conf["jid"], conf["password"])
        self.conf = conf
        self.call = call
        self.target = conf["target"]
        self.ca_certs = conf["ca_file"]
        self.online = asyncio.Event()
        self.target_seen = asyncio.Event()
        self.add_event_handler("session_start", self.start)
        self.add_event_handler("message", self.message)
        self.add_event_handler("presence_available", self.presence)
        self.add_event_handler("failed_auth", lambda _: self.call.xmpp_failed())

    async def start(self, _event):
        self.send_presence()
        if self.conf.get("presence", "available") != "any":
            await self.get_roster()
        self.online.set()

    def presence(self, pres):
        if pres["from"].bare == self.target:
            self.target_seen.set()

    def message(self, msg):
        if msg["type"] in ("chat", "normal") and msg["from"].bare == self.target:
            self.call.reply(msg["body"])

    def say(self, text):
        self.send_message(mto=self.target, mbody=text, mtype="chat")


class Call:
    def __init__(self, conf, n):
        self.conf = conf
        self.n = n
        self.vars = {}
        self.vars_in = asyncio.Event()
        self.popped = False
        self.outcome = None
        self.xmpp = None

    def finish(self, letter, action, reply=None):
        if self.outcome is not None:
            return
        self.outcome = action
        values = "POPIVR_ACTION=" + action
        if reply is not None:
            values += ",POPIVR_REPLY=" + reply
        command("V," + values)
        command(letter + ",popivr")

    def reply(self, body):
        if self.outcome is not None or not self.popped:
            return
        word = (body or "").strip().split(" ")[0].lower()
        if word in ("1", "desk"):
            self.finish("E", "desk", body)
            self.xmpp.say("#%s: sent to desk" % self.n)
        elif word == "h":
            self.finish("H", "hangup", body)
            self.xmpp.say("#%s: hung up" % self.n)
        else:
            self.xmpp.say("Reply 1 desk, h hang up")

    def xmpp_failed(self):
        self.finish("E", "operator")

    def pop_text(self):
        v = self.vars
        return "Call from %s <%s> to %s #%s. Reply 1 desk, h hang up" % (
            v.get("CALLERID(name)", ""),
            v.get("CALLERID(num)", ""),
            v.get("EXTEN", ""),
            self.n,
        )

    async def events(self, reader):
        """Asterisk's events; returns at EOF or hangup."""
        while True:
            line = await reader.readline()
            if not line:
                return
            tag, _, rest = line.decode().strip().partition(",")
            _ts, _, data = rest.partition(",")
            if tag == "G" and "=" in data:
                name, _, value = data.partition("=")
                self.vars[name] = value
                if len(self.vars) == len(VARIABLES):
                    self.vars_in.set()
            elif tag == "F":
                command("A," + data)
            elif tag == "0":
                self.finish("E", "operator")
            elif tag == "H":
                return

    async def run(self, reader):
        command("S," + HOLD[0])
        for f in HOLD[1:]:
            command("A," + f)
        for name in VARIABLES:
            command("G," + name)
        events = asyncio.ensure_future(self.events(reader))

        self.xmpp = Pop(self.conf, self)
        self.xmpp.connect(self.conf["host"], int(self.conf["port"]))
        # Asterisk may hang up before the login is done or the reads are
        # answered: then leave at once.
        for step in (self.xmpp.online.wait(), self.vars_in.wait()):
            step = asyncio.ensure_future(step)
            await asyncio.wait([step, events], return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                self.xmpp.abort()
                return
        if self.conf.get("presence", "available") != "any":
            wait = float(self.conf.get("presence_wait", "1.5"))
            try:
                await asyncio.wait_for(self.xmpp.target_seen.wait(), wait)
            except asyncio.TimeoutError:
                pass
            if not self.xmpp.target_seen.is_set():
                self.finish("E", "operator")
        if self.outcome is None:
            self.xmpp.say(self.pop_text())
            self.popped = True
        timeout = float(self.conf.get("timeout", "30"))
        try:
            await asyncio.wait_for(asyncio.shield(events), timeout)
        except asyncio.TimeoutError:
            self.finish("E", "operator")
            await events
        if self.popped and self.outcome is None:
            self.xmpp.say("Missed call from %s" % self.vars.get("CALLERID(num)", ""))
        self.xmpp.disconnect(wait=0.05)
        await self.xmpp.disconnected


async def main():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.environ["POPIVR_PEER_CONFIG"])
    conf = dict(parser["peer"])
    n = ""
    for arg in sys.argv[1:]:
        if arg.startswith("n="):
            n = arg[2:]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0)
    )
    await Call(conf, n).run(reader)


if __name__ == "__main__":
    asyncio.run(main())
