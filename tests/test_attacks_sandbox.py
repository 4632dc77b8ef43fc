"""Issue 16's sandbox attacks replayed through `kimi run --agent` (scripted model), as the tests'
user (root in CI), with bubblewrap and without it: each must fail.

HOME is a fake home with fake secrets; kimi's environment holds fake tokens.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_chat_pty
from agent_script import answer, call, step
from test_cli import KIMI, assert_one_error_line, kimi

from kimi_cli import config
from kimi_cli.agent.sandbox import Sandbox, bwrap_works, seatbelt_profile

KEY = "-----BEGIN OPENSSH PRIVATE KEY----- fake"
HF = "hf_faketoken0123456789"
GIT = "https://me:ghp_fakegitcredential@github.com"
HISTORY = "mysql -p'fake-history-password'"
SECRET_ENV = {"GH_PAT": "ghp_fake_pat", "ANTHROPIC_KEY": "sk-ant-fake",
              "DATABASE_URL": "postgres://u:fakepw@db/x", "HF_TOKEN": HF,
              "SSH_AUTH_SOCK": "/tmp/fake-agent.sock", "DBUS_SESSION_BUS_ADDRESS": "unix:fake"}
SECRETS = [KEY, HF, GIT, HISTORY, *SECRET_ENV.values()]

needs_bwrap = [pytest.mark.sandbox,
               pytest.mark.skipif(not bwrap_works(), reason="bubblewrap is not installed or "
                                  "cannot create namespaces here")]
# Without a sandbox, yolo needs the alarming flag; --no-sandbox forces that path here.
UNSANDBOXED = ["--dangerously-bypass-approvals-and-sandbox"]
SANDBOXED = ["--approval", "yolo"]
BOTH = [pytest.param(SANDBOXED, id="bubblewrap", marks=needs_bwrap),
        pytest.param(UNSANDBOXED, id="no-sandbox")]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A fake home: an SSH key, our HF token, git credentials, shell history and rc, a tool
    installed under it, and the project (the workspace)."""
    home = tmp_path_factory.mktemp("attacks") / "home"
    files = {".ssh/id_rsa": KEY, ".cache/huggingface/token": HF,
             ".config/git/credentials": GIT, ".bash_history": HISTORY, ".bashrc": "# rc\n",
             "tools/bin/hello": "#!/bin/sh\necho hello from tools\n", "project/notes": "hi\n"}
    for rel, text in files.items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(text)
    (home / "tools/bin/hello").chmod(0o755)
    return home


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("KIMI_MODEL", "KIMI_MLX_HOME", "NO_COLOR", "FORCE_COLOR", "CI")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (home.parent / var).mkdir(exist_ok=True)
        e[var] = str(home.parent / var)
    return {**e, **SECRET_ENV, "HOME": str(home), "HF_HUB_OFFLINE": "1", "KEEP_ME": "kept"}


def agent(home: Path, commands: list[str | dict], flags: list[str], env: dict,
          ws: Path | None = None, timeout: float = 120):
    """One step calling shell for each command (or arguments dict), then an answer."""
    ws = ws or home / "project"
    calls = [call("shell", i, **(c if isinstance(c, dict) else {"command": c}))
             for i, c in enumerate(commands)]
    spec = home.parent / f"script-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps([step(*calls), answer("done")]))
    r = kimi("run", "--agent", "-w", str(ws), "-m", f"scripted:{spec}", "--format", "json",
             *flags, "attack", env=env, timeout=timeout)
    return r


def results(r) -> list[str]:
    assert r.returncode == 0, r.stderr
    return [c.get("content", "") for c in json.loads(r.stdout)["tool_calls"]]


def untouched(home: Path) -> None:
    assert (home / ".bashrc").read_text() == "# rc\n"
    assert (home / ".ssh/id_rsa").read_text() == KEY
    assert not any(home.parent.glob("pwned*")) and not os.path.exists("/pwned-by-kimi-test")


# 1. Root in the sandbox: no capabilities, no remount, no unmount, no /etc/shadow.

@pytest.mark.parametrize("flags", [pytest.param(SANDBOXED, marks=needs_bwrap)])
def test_as_root_the_sandbox_has_no_capabilities_to_remount_unmount_or_read_shadow(
        home, env, flags):
    r = agent(home, [
        "grep Cap /proc/self/status; id -u",
        "mount -o remount,bind,rw / && touch /pwned-by-kimi-test; echo rc=$?",
        f"umount {home} ; cat {home}/.ssh/id_rsa; echo rc=$?",
        "cat /etc/shadow /etc/gshadow; ls /etc/ssl/private; echo rc=$?",
        "unshare -Urm sh -c 'mount -o remount,rw / && touch /pwned-by-kimi-test'; echo rc=$?",
    ], flags, env)
    caps, remount, umount, shadow, nested = results(r)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert f"{name}:\t0000000000000000" in caps
    if os.geteuid() == 0:
        assert f"\n{65534}\n" in caps  # root outside is nobody inside
    assert "rc=0" not in remount + umount + nested
    assert "root:" not in shadow and "rc=0" not in shadow
    assert KEY not in umount
    untouched(home)


# Past the command parser's hard-deny rules: what only the sandbox stops.
SNEAKY_READ = "import os; print(open(os.path.expanduser('~') + '/.s' + 'sh/id_rsa').read())"
SNEAKY_APPEND = "import os; open(os.path.expanduser('~') + '/.bash' + 'rc', 'a').write('evil')"


# 2. The sandbox sees the workspace, the system and an empty home; --sandbox-allow adds paths.

@pytest.mark.parametrize("flags", [pytest.param(SANDBOXED, marks=needs_bwrap)])
def test_the_sandbox_shows_none_of_the_home_but_what_is_allowed(home, env, flags):
    r = agent(home, [
        # Past the hard rules (they refuse these names): only the sandbox's empty home stops it.
        "for f in .cache/hugging?ace/token .config/git/cred?ntials .bash_hist?ry; do "
        "cat ~/$f; done; "
        f"python3 -c {SNEAKY_READ!r}",
        f"ls -A ~; python3 -c {SNEAKY_APPEND!r}; echo written",
        "python3 -c 'print(6*7)' && git --version >/dev/null && echo tools ok",
        "echo made > made.txt && cat notes",
        f"{home}/tools/bin/hello; python3 -c \"open('{home}/tools/pwned', 'w')\"; echo rc=$?",
        "ls /run /var/run /home /mnt /srv 2>&1 | head -3; echo end",
    ], [*flags, "--sandbox-allow", f"{home}/tools:ro"], env)
    secrets, listing, tools, inside, allowed, hidden = results(r)
    assert not any(s in secrets for s in SECRETS) and "No such file" in secrets
    assert listing.split("\n")[0] in ("project", "written")  # only the workspace's mount point
    assert tools.startswith("42\ntools ok")
    assert inside.startswith("hi\n") and (home / "project/made.txt").read_text() == "made\n"
    assert allowed.startswith("hello from tools") and "rc=0" not in allowed
    assert not (home / "tools/pwned").exists()
    assert "No such file" in hidden
    untouched(home)


def test_the_macos_profile_denies_the_home_but_the_workspace_and_allowed_paths(tmp_path):
    from kimi_cli.agent.sandbox import Grant

    tools = tmp_path / "tools"
    profile = seatbelt_profile(tmp_path / "ws", False, (Grant(tools),))
    lines = profile.splitlines()
    home = Path(os.path.realpath(os.path.expanduser("~")))
    deny_home = lines.index(f'(deny file-read* file-write* (subpath "{home}"))')
    allow_read = next(i for i, line in enumerate(lines) if line.startswith("(allow file-read*"))
    assert deny_home < allow_read and f'(subpath "{tools}")' in lines[allow_read]
    write_rule = next(line for line in lines if line.startswith("(allow file-write*"))
    assert f'"{tmp_path / "ws"}"' in write_rule and str(tools) not in write_rule
    assert "(deny network*)" in lines
    networked = seatbelt_profile(tmp_path / "ws", True).splitlines()
    assert "(deny network*)" not in networked
    assert "(deny network-outbound (remote unix-socket))" in networked


# 3. No sandbox: yolo is refused (run and chat) unless the alarming flag says otherwise.

@pytest.mark.parametrize("command", ["run", "chat"])
def test_yolo_without_a_sandbox_is_refused_before_anything_loads(home, env, command):
    r = kimi(command, "--agent", "--approval", "yolo", "--no-sandbox", "-w",
             str(home / "project"), "-m", "scripted:/nonexistent.json", "task", env=env)
    assert r.returncode == 2
    assert_one_error_line(r.stderr)
    assert "needs a sandbox" in r.stderr and "--dangerously-bypass-approvals-and-sandbox" in r.stderr


def test_without_bubblewrap_the_refusal_says_how_to_install_it(home, env, tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with bash and python but no bwrap
    bin_dir.mkdir()
    for tool in ("bash", "sh", "python3"):
        os.symlink(f"/usr/bin/{tool}", bin_dir / tool)
    r = kimi("run", "--agent", "--approval", "yolo", "-w", str(home / "project"), "-m",
             "scripted:/nonexistent.json", "task", env={**env, "PATH": str(bin_dir)})
    assert r.returncode == 2, r.stderr
    assert "apt install bubblewrap" in r.stderr and "dnf install bubblewrap" in r.stderr


def test_the_bypass_flag_runs_unconfined_and_says_so_loudly(home, env):
    r = agent(home, ["echo ran"], UNSANDBOXED, env)
    assert results(r) == ["ran\n[exit code 0]"]
    assert "WARNING: --dangerously-bypass-approvals-and-sandbox" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["approval"] == "yolo" and doc["sandbox"].startswith("NONE")
    bad = kimi("run", "--agent", "--approval", "ask", *UNSANDBOXED, "-m", "scripted:/x", "t",
               env=env)
    assert bad.returncode == 2 and "does not go with --approval ask" in bad.stderr


def test_auto_edit_without_a_sandbox_edits_in_the_workspace_only_and_asks_for_commands(
        home, env):
    spec = home.parent / "auto-edit.json"
    spec.write_text(json.dumps([step(
        call("write_file", 0, path="ok.txt", content="fine\n"),
        call("write_file", 1, path=str(home / "pwned-auto-edit"), content="x"),
        call("shell", 2, command="touch pwned-by-command")), answer("done")]))
    r = kimi("run", "--agent", "--approval", "auto-edit", "--no-sandbox", "-w",
             str(home / "project"), "-m", f"scripted:{spec}", "--format", "json", "t", env=env)
    assert r.returncode == 0, r.stderr
    calls = json.loads(r.stdout)["tool_calls"]
    assert (home / "project/ok.txt").read_text() == "fine\n"
    assert calls[1]["ok"] is False and not (home / "pwned-auto-edit").exists()
    assert calls[2]["decision"] == "denied" and not (home / "project/pwned-by-command").exists()


# 4. Commands get an allow-listed environment, plus what --env names.

@pytest.mark.parametrize("flags", BOTH)
def test_commands_get_no_secret_from_the_environment(home, env, flags):
    r = agent(home, ["env", "echo \"$GH_PAT$HF_TOKEN$SSH_AUTH_SOCK$DBUS_SESSION_BUS_ADDRESS\""],
              [*flags, "--env", "KEEP_ME", "--env", "SET_ME=given"], env)
    listing, echoed = results(r)
    assert not any(v in listing + echoed for v in SECRET_ENV.values())
    assert "KEEP_ME=kept" in listing and "SET_ME=given" in listing
    assert f"HOME={home}" in listing and "PATH=" in listing


@pytest.mark.parametrize("flags", [pytest.param(SANDBOXED, marks=needs_bwrap)])
def test_in_the_sandbox_the_parent_process_environment_holds_no_secret(home, env, flags):
    (out,) = results(agent(home, ["cat /proc/$PPID/environ /proc/1/environ | tr '\\0' '\\n'"],
                           flags, env))
    assert not any(v in out for v in SECRET_ENV.values()) and "PATH=" in out


# 5. A call's processes end with it, also those that left its session; timeouts are capped.

def _running(marker: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != "Z":
            pids.append(int(pid))
    return pids


def _gone(*markers: str, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while any(_running(m) for m in markers):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("flags", BOTH)
def test_background_and_setsid_processes_end_with_the_call(home, env, flags):
    tag = str(3000 + os.getpid() % 1000)
    r = agent(home, [
        f"sleep {tag}1 & setsid sleep {tag}2 & (setsid sh -c 'sleep {tag}3 &') ; echo started",
        {"command": f"setsid sleep {tag}4 & sleep {tag}5", "timeout": 1},
    ], flags, env)
    normal, timed_out = results(r)
    assert normal.startswith("started") and "timed out after 1 s" in timed_out
    assert _gone(*(f"{tag}{i}" for i in range(1, 6)))


def test_the_timeout_a_model_may_ask_for_is_capped_and_the_user_can_raise_it(home, env):
    big = config.AGENT_SHELL_MAX_TIMEOUT + 100
    (refused,) = results(agent(home, [{"command": "echo ran", "timeout": big}], UNSANDBOXED, env))
    assert "ran" not in refused and "--max-command-timeout" in refused
    (allowed,) = results(agent(home, [{"command": "echo ran", "timeout": big}],
                               [*UNSANDBOXED, "--max-command-timeout", str(big)], env))
    assert allowed == "ran\n[exit code 0]"


# 6. No host sockets, no agent forwarding; no workspace that holds the home's secrets.

@pytest.mark.parametrize("flags", [pytest.param(SANDBOXED, marks=needs_bwrap, id="no-network"),
                                   pytest.param([*SANDBOXED, "--allow-network"], marks=needs_bwrap,
                                                id="network")])
def test_host_unix_sockets_are_unreachable_from_the_sandbox(home, env, flags):
    # With the host's network, abstract sockets (X11's, D-Bus's) would be: no AF_UNIX at all.
    path = home.parent / "agent.sock"  # outside the workspace, like ssh-agent's or docker's
    abstract = f"\0kimi-test-{os.getpid()}"
    servers = []
    for address in (str(path), abstract):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(1)
        servers.append(s)
    probe = ("import socket, sys\nfor a in sys.argv[1:]:\n try:\n"
             "  s = socket.socket(socket.AF_UNIX)\n  s.connect(a.replace('@', chr(0)))\n"
             "  print('connected', a)\n"
             " except OSError as e:\n  print('refused', a, e.errno)\n")
    (home / "project/probe.py").write_text(probe)
    try:
        (out,) = results(agent(home, [f"python3 probe.py {path} @kimi-test-{os.getpid()}"],
                               [*flags, "--env", f"SSH_AUTH_SOCK={path}"], env))
    finally:
        for s in servers:
            s.close()
        path.unlink()
    assert "connected" not in out and out.count("refused") == 2


shared_cache = test_chat_pty.shared_cache
term_factory = test_chat_pty.term_factory


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_agent_on_in_a_chat_started_in_the_home_directory_is_refused(tmp_path, shared_cache,
                                                                    term_factory):
    e = {k: v for k, v in os.environ.items() if k not in ("KIMI_MODEL", "KIMI_MLX_HOME")}
    for var in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        (tmp_path / var).mkdir()
        e[var] = str(tmp_path / var)
    e.update(XDG_CACHE_HOME=str(shared_cache), HF_HUB_OFFLINE="1", TERM="xterm-256color",
             HOME=os.getcwd(), KIMI_NO_HISTORY="1")  # the chat's workspace is the home
    t = term_factory(["chat", "--model", test_chat_pty.script(tmp_path, [answer("hi")])], e)
    t.prompt_ready(1)
    t.line("/agent on")
    t.wait_for("/agent:")
    assert "is or contains the home directory" in t.text() and "agent mode on" not in t.text()


def test_a_workspace_holding_the_homes_secrets_is_refused(home, env):
    for ws in (home, home.parent, home / ".ssh"):
        r = kimi("run", "--agent", "-w", str(ws), "-m", "scripted:/x", "task", env=env)
        assert r.returncode == 2, (ws, r.stderr)
        assert_one_error_line(r.stderr)
        assert "--workspace" in r.stderr and ("home directory" in r.stderr or ".ssh" in r.stderr)


# 11. No controlling terminal: TIOCSTI cannot type into the user's terminal.

TIOCSTI_PROBE = """import errno, fcntl, os, termios
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"y")
        print(fd, "typed")
    except OSError as e:
        print(fd, errno.errorcode[e.errno])
try:
    os.open("/dev/tty", os.O_RDWR)
    print("tty opened")
except OSError as e:
    print("tty", errno.errorcode[e.errno])
"""


@pytest.mark.parametrize("flags", BOTH)
def test_commands_have_no_controlling_terminal_to_type_into(home, env, flags, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    (home / "project/tiocsti.py").write_text(TIOCSTI_PROBE)
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps([step(call("shell", 0, command="python3 tiocsti.py")),
                                answer("done")]))
    out = tmp_path / "out.json"
    child = pexpect.spawn(KIMI[0], [*KIMI[1:], "run", "--agent", *flags, "-w",
                                    str(home / "project"), "-m", f"scripted:{spec}", "--format",
                                    "json", "task"], env={**env, "TERM": "xterm"},
                          encoding="utf-8", timeout=60, logfile=out.open("w"))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, out.read_text()
    doc = json.loads(out.read_text().replace("\r\n", "\n").strip().splitlines()[-1])
    result = doc["tool_calls"][0]["content"]
    assert "typed" not in result and "tty opened" not in result
    assert "tty ENXIO" in result  # no controlling terminal at all
    assert all(f"{fd} ENOTTY" in result for fd in (0, 1, 2))


# 14. Sessions, KV caches and history are private.

def test_session_files_are_private_in_private_directories(tmp_path, monkeypatch):
    from kimi_cli.sessions import Session, private_dir

    monkeypatch.setenv("KIMI_MLX_HOME", str(tmp_path / "kimi"))
    state = config.state_dir()
    session = Session.create("m", {}, None)
    session.append({"role": "user", "content": "my token is hf_x"})
    session.append({"role": "assistant", "content": "ok"})
    mode = stat.S_IMODE
    assert mode(session.path.stat().st_mode) == 0o600
    assert mode(session.path.parent.stat().st_mode) == 0o700
    assert mode(state.stat().st_mode) == 0o700
    # kimi's own directory from an older version is tightened; a user's directory is not.
    user_dir = tmp_path / "user"
    user_dir.mkdir(mode=0o755)
    user_dir.chmod(0o755)
    state.chmod(0o755)
    private_dir(state / "sessions")
    private_dir(user_dir / "new")
    assert mode(state.stat().st_mode) == 0o700
    assert mode(user_dir.stat().st_mode) == 0o755
    assert mode((user_dir / "new").stat().st_mode) == 0o700


def test_describe_names_what_the_sandbox_allows():
    assert "NONE" in Sandbox("none", bypass=True).describe()
    assert "no network" in Sandbox("bubblewrap").describe()


def test_kv_caches_and_the_input_history_are_private(tmp_path, monkeypatch, tiny_ckpt):
    from kimi_cli.chat.reply import generate_reply
    from kimi_cli.engine import Engine, SamplingSettings
    from kimi_cli.loader import load
    from kimi_cli.sessions import model_fingerprint, save_kv, sessions_dir
    from kimi_cli.ui.input import PromptReader, history_path

    monkeypatch.setenv("KIMI_MLX_HOME", str(tmp_path / "kimi"))
    monkeypatch.delenv("KIMI_NO_HISTORY", raising=False)
    model, tok = load(tiny_ckpt)
    engine = Engine(model, tok)
    generate_reply(engine, tok, tok.encode("hello"), SamplingSettings(temperature=0, max_tokens=2))
    kv = sessions_dir() / "s.kv.safetensors"
    save_kv(kv, engine, model_fingerprint(model))
    assert stat.S_IMODE(kv.stat().st_mode) == 0o600
    assert stat.S_IMODE(kv.parent.stat().st_mode) == 0o700
    PromptReader().session.history.store_string("my password is hunter2")
    assert "hunter2" in history_path().read_text()
    assert stat.S_IMODE(history_path().stat().st_mode) == 0o600
    assert stat.S_IMODE(history_path().parent.stat().st_mode) == 0o700


# Found red-teaming the fixes: as root a file the sandbox writes is root's outside it.

SETUID_PROBES = [
    "cp /bin/sh ./rootsh && chmod 4755 ./rootsh",
    "install -m 6755 /bin/true ./suid-install",
    "python3 -c \"import os; os.close(os.open('suid-open', os.O_CREAT | os.O_WRONLY, 0o4755))\"",
    "python3 -c \"import os; os.mknod('suid-mknod', 0o104755)\"",
    "touch suid-perl && perl -e 'chmod 02755, \"suid-perl\" or exit 1'",
    "touch plain && chmod 755 plain && mkdir -p d/e && chmod g+w d && echo fine",
]


@pytest.mark.parametrize("flags", [pytest.param(SANDBOXED, marks=needs_bwrap)])
def test_the_sandbox_cannot_plant_setuid_or_setgid_files_on_the_host(home, env, flags):
    ws = home.parent / f"setuid-{time.monotonic_ns()}"
    ws.mkdir()
    out = results(agent(home, SETUID_PROBES, flags, env, ws=ws))
    modes = {p.name: p.lstat().st_mode for p in ws.rglob("*")}
    assert not [name for name, m in modes.items() if m & (stat.S_ISUID | stat.S_ISGID)], modes
    assert "Operation not permitted" in out[0] and out[-1] == "fine\n[exit code 0]"
    assert stat.S_IMODE(modes["plain"]) == 0o755  # ordinary modes still work


def test_the_seccomp_filter_assembles_for_both_linux_architectures():
    from kimi_cli.agent import seccomp

    for machine in ("x86_64", "aarch64"):
        prog = seccomp.program(machine)
        assert len(prog) % 8 == 0 and 20 < len(prog) // 8 < 256  # jumps are 8-bit


@pytest.mark.parametrize("flags", [pytest.param(SANDBOXED, marks=needs_bwrap)])
def test_the_sandbox_cannot_change_the_workspaces_git_or_envrc(home, env, flags, tmp_path):
    # .git/config's core.fsmonitor would run on your next `git status`, outside the sandbox.
    ws = tmp_path / "repo"
    ws.mkdir()
    git = ["git", "-C", str(ws)]
    subprocess.run([*git, "init", "-q"], check=True, env=env)
    (ws / ".envrc").write_text("export X=1\n")
    config_before = (ws / ".git/config").read_text()
    hook = f"touch {tmp_path}/pwned-fsmonitor"
    r = agent(home, [
        "python3 -c \"p = '.g' + 'it/con' + 'fig'; open(p, 'a').write('[core]\\n"
        f"\\tfsmonitor = {hook}\\n')\"",
        "python3 -c \"import os; os.rename('.g' + 'it', '.old')\"; echo rc=$?",
        "python3 -c \"open('.en' + 'vrc', 'a').write('evil')\"; echo rc=$?",
        "git status --short >/dev/null && echo git reads",
    ], flags, env, ws=ws)
    config, renamed, envrc, reads = results(r)
    assert "Read-only file system" in config
    assert "Device or resource busy" in renamed and "rc=0" not in renamed
    assert "Read-only file system" in envrc and "rc=0" not in envrc
    assert reads == "git reads\n[exit code 0]"
    assert (ws / ".git/config").read_text() == config_before
    assert (ws / ".envrc").read_text() == "export X=1\n" and not (ws / ".old").exists()
    subprocess.run([*git, "status"], capture_output=True, env=env)  # you, later, outside
    assert not (tmp_path / "pwned-fsmonitor").exists()
    # An explicit grant reopens it.
    (opened,) = results(agent(home, ["python3 -c \"open('.g' + 'it/config', 'a').write('#')\" "
                                     "&& echo written"],
                              [*flags, "--sandbox-allow", f"{ws}/.git:rw"], env, ws=ws))
    assert opened == "written\n[exit code 0]"


@pytest.mark.parametrize("flags", [pytest.param(SANDBOXED, marks=needs_bwrap)])
def test_protected_files_the_sandbox_creates_are_renamed_away(home, env, flags, tmp_path):
    # No .git yet (a workspace inside a bigger repo, or none): a new one with a hook would run
    # on your next `git status` here; a new .envrc on your next `cd` (direnv).
    ws = tmp_path / "plain"
    ws.mkdir()
    (ws / ".envrc.kimi-blocked").write_text("an older one\n")
    hook = f"touch {tmp_path}/pwned-hook"
    r = agent(home, [
        "git init -q && python3 -c \"open('.g' + 'it/config', 'a').write('[core]\\n"
        f"\\tfsmonitor = {hook}\\n')\"; ls -A",
        "python3 -c \"open('.en' + 'vrc', 'w').write('touch pwned')\"",
        "echo plain > notes.md",
    ], flags, env, ws=ws)
    init, envrc, plain = results(r)
    assert "[kimi: the command created .git → .git.kimi-blocked:" in init
    assert "created .envrc → .envrc.kimi-blocked-2:" in envrc and "[kimi:" not in plain
    assert sorted(p.name for p in ws.iterdir()) == [
        ".envrc.kimi-blocked", ".envrc.kimi-blocked-2", ".git.kimi-blocked", "notes.md"]
    subprocess.run(["git", "-C", str(ws), "status"], capture_output=True, env=env)
    assert not (tmp_path / "pwned-hook").exists()
