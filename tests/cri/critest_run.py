"""critest (the CRI validation suite, cri-tools v1.26.1) against a private containerd,
once per runtime handler (uspawn, runc and uspawn-pods), compared with
critest-expected.json (issue 14).

    .venv/bin/python tests/cri/critest_run.py [--handlers uspawn,runc,uspawn-pods] [--out DIR]
    (or scripts/critest.sh)

One session: containerd (tests/cri/cri_env.py: root, state, sockets, CNI config, pod logs
under one /tmp/uspawn-critest-* directory, handlers `uspawn`, `runc` and `uspawn-pods`),
Debian's docker-registry on 127.0.0.1 only with its storage in that directory, the images
critest names, built here from the project's busybox rootfs and pushed to that registry.
containerd's CRI maps registry.k8s.io and gcr.io onto it (hosts.toml `server`), so
critest runs with its own image names and nothing leaves the host.

The images (critest's own are on public registries) share one base layer: the project's
busybox rootfs (passwd, group, directories) with Debian's dynamically linked `busybox`
package in place of busybox-static, its applets hard-linked, as in the busybox image;
the busybox image adds Debian's pgrep and ipcs with their libraries (specs run them;
busybox has neither); the user and tag images carry the USER and marker files of
cri-tools' images/ Dockerfiles; nginx, httpd, nonewprivs and the sandbox's pause are
stand-ins (tests/cri/critest_stub.c) that do what the specs look at: serve HTTP 200 on
the port, nginx's pid file and process title, Apache's start line, a setuid-root binary
printing its effective uid, a pid 1 named pause that waits for a signal.

Environment: the bridge gets the subnet's first address so the host (critest) reaches
the pods (no route or forwarding change beyond that /24 on the bridge); no portmap
plugin (the host's iptables are left alone); containerd and critest share a private IPC
namespace (the hostIPC specs make shared memory segments with ipcmk, which would
otherwise stay on the host). The handler's pods run under it; the `-runtime-handler`
flag picks it per run. Exit status 0 when every spec ended as the expectation file says.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE.parent) not in sys.path:  # tests/: conftest, fixtures, waits, cri
    sys.path.insert(0, str(HERE.parent))

from cri.cri_env import (  # noqa: E402
    CACHE,
    CriEnv,
    ImageSet,
    ImageSpec,
    Registry,
    build_images,
    ensure_tools,
    mounts_matching,
    tools_src,
)
from uspawn.tree.busybox import GROUP, PASSWD, build_busybox_rootfs  # noqa: E402

EXPECTED = HERE / "critest-expected.json"
STUB_SRC = HERE / "critest_stub.c"
CRITEST_VERSION = "v1.26.1"
E2E = "registry.k8s.io/e2e-test-images/"
STAGING = "gcr.io/k8s-staging-cri-tools/"
PAUSE = "registry.k8s.io/pause:3.6"
MIRRORED = ("registry.k8s.io", "gcr.io")


def critest_images(stub: bytes) -> dict[str, ImageSpec]:
    """Every image critest v1.26.1 pulls on linux/amd64 (pkg/validate/consts.go,
    multi_container_linux.go, security_context_linux.go, framework/util.go), plus the
    sandbox image. test-image-digest is pushed under a tag: the spec pulls it by the
    digest of the public image, which a locally built one cannot have."""
    www = PASSWD + "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    www_group = GROUP + "www-data:x:33:\n"

    def marker(name: str) -> ImageSpec:
        # cri-tools images/image-test: FROM busybox, ADD <name> (an empty file).
        return ImageSpec(cmd=["sh"], files={f"/{name}": (b"", 0o644)})

    def user(u: str) -> ImageSpec:
        return ImageSpec(cmd=["sh"], user=u, files={"/etc/passwd": (www.encode(), 0o644),
                                                    "/etc/group": (www_group.encode(), 0o644)})

    nginx = {"/usr/sbin/nginx": (stub, 0o755), "/var/run": (None, 0o755)}
    predefined_passwd = PASSWD.replace("user:x:1000:1000:user:/home/user:/bin/sh",
                                       "default-user:x:1000:1000::/home/default-user:/bin/sh")
    predefined_group = GROUP.replace("user:x:1000:\n", "default-user:x:1000:\n") \
        + "group-defined-in-image:x:50000:default-user\n"
    images = {
        PAUSE: ImageSpec(entrypoint=["/pause", "pause"], files={"/pause": (stub, 0o755)}),
        E2E + "busybox:1.29-2": ImageSpec(cmd=["sh"], files=host_tools()),
        E2E + "nginx:1.14-2": ImageSpec(entrypoint=["/usr/sbin/nginx", "nginx", "80"],
                                        files=nginx),
        STAGING + "hostnet-nginx-amd64:latest": ImageSpec(
            entrypoint=["/usr/sbin/nginx", "nginx", "12003"], files=nginx),
        E2E + "httpd:2.4.39-4": ImageSpec(
            entrypoint=["/usr/local/apache2/bin/httpd", "httpd", "80"],
            files={"/usr/local/apache2/bin/httpd": (stub, 0o755)}),
        E2E + "nonewprivs:1.3": ImageSpec(
            entrypoint=["/usr/local/bin/nnp", "nnp"],
            files={"/usr/local/bin/nnp": (stub, 0o4755)}),
        STAGING + "test-image-user-uid:latest": user("1002"),
        STAGING + "test-image-user-username:latest": user("www-data"),
        STAGING + "test-image-user-uid-group:latest": user("1003:1004"),
        STAGING + "test-image-user-username-group:latest": user("www-data:1004"),
        STAGING + "test-image-predefined-group:latest": ImageSpec(
            cmd=["sh"], user="1000",
            files={"/etc/passwd": (predefined_passwd.encode(), 0o644),
                   "/etc/group": (predefined_group.encode(), 0o644)}),
        STAGING + "test-image-latest:latest": marker("test-image-latest"),
        STAGING + "test-image-digest:latest": marker("test-image-digest"),
    }
    for n in (1, 2, 3):
        images[STAGING + f"test-image-{n}:latest"] = marker(f"test-image-{n}")
        images[STAGING + f"test-image-tags:{n}"] = marker("same-image")
    for tag in ("test", "all"):
        images[STAGING + f"test-image-tag:{tag}"] = marker("test-image-tag")
    return images


def libraries(binary: str) -> list[str]:
    """The shared libraries ldd names for binary, with the dynamic loader."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = [line.split("=>")[-1].split("(")[0].strip() for line in out.splitlines()]
    return [lib for lib in libs if lib.startswith("/")]


def debian_busybox(dest: Path) -> Path:
    """bin/busybox of Debian's `busybox` package (dynamically linked), extracted under
    dest; the .deb is fetched once with `apt-get download` into CACHE/debs. Its ash runs
    commands through PATH, as the busybox image's does; busybox-static's (the project's
    rootfs) runs its applets itself (FEATURE_SH_STANDALONE), so a masked /bin/ls would
    never be executed (the MaskedPaths spec)."""
    debs = CACHE / "debs"
    found = sorted(debs.glob("busybox_*.deb"))
    if not found:
        debs.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["apt-get", "download", "-q", "busybox"], cwd=debs,
                             capture_output=True, text=True)
        found = sorted(debs.glob("busybox_*.deb"))
        if res.returncode != 0 or not found:
            raise SystemExit(f"critest: apt-get download busybox failed: {res.stderr}")
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(dest)], check=True)
    return dest / "bin" / "busybox"


def swap_busybox(rootfs: Path, binary: Path) -> None:
    """rootfs (the project's busybox rootfs) with binary as /bin/busybox, its libraries,
    and its applets as hard links, as in the busybox image (the rootfs has symlinks: a
    bind mount over /bin/ls, the MaskedPaths spec, would mask busybox itself)."""
    for d, _, names in os.walk(rootfs):
        for n in names:
            path = Path(d) / n
            if path.is_symlink() and os.readlink(path).endswith("bin/busybox"):
                path.unlink()
    target = rootfs / "bin" / "busybox"
    target.unlink()
    shutil.copyfile(binary, target)
    target.chmod(0o755)
    for lib in libraries(str(binary)):
        dest = rootfs / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(lib).resolve(), dest)
        dest.chmod(0o755)
    applets = subprocess.run([str(binary), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = rootfs / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(target, link)


def host_tools(names: tuple[str, ...] = ("pgrep", "ipcs")) -> dict[str, tuple[bytes | None, int]]:
    """Debian's pgrep (procps) and ipcs (util-linux) with their libraries, at the host's
    paths: critest runs them in its busybox image, and Debian's busybox has neither."""
    files: dict[str, tuple[bytes | None, int]] = {}
    for name in names:
        path = shutil.which(name)
        if path is None:
            print(f"critest: no {name} on the host; specs that run it will fail",
                  file=sys.stderr)
            continue
        files[path] = (Path(path).read_bytes(), 0o755)
        for lib in libraries(path):
            files[lib] = (Path(lib).resolve().read_bytes(), 0o755)
    return files


def build_stub(dest: Path) -> bytes:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("critest: no C compiler (apt-get install gcc libc6-dev)")
    subprocess.run([cc, "-static", "-O2", "-o", str(dest), str(STUB_SRC)], check=True)
    return dest.read_bytes()


# ---------------------------------------------------------------- reports


def parse_report(path: Path) -> dict[str, dict[str, Any]]:
    """Ginkgo v2's JSON report -> spec name -> state (passed, failed, skipped, ...),
    seconds and the failure's message."""
    specs: dict[str, dict[str, Any]] = {}
    for suite in json.loads(path.read_text()):
        for r in suite.get("SpecReports") or []:
            if r.get("LeafNodeType") != "It":
                continue
            name = " ".join([*(r.get("ContainerHierarchyTexts") or []), r["LeafNodeText"]])
            failure = r.get("Failure") or {}
            specs[name] = {"state": r["State"], "seconds": round(r.get("RunTime", 0) / 1e9, 1),
                           "message": (failure.get("Message") or "").strip()}
    return specs


def outcome(state: str) -> str:
    return state if state in ("passed", "skipped", "pending") else "failed"


def totals(specs: dict[str, dict[str, Any]]) -> dict[str, int]:
    out = {"passed": 0, "failed": 0, "skipped": 0}
    for s in specs.values():
        o = outcome(s["state"])
        out[o if o in out else "skipped"] += 1
    return out


def compare(handler: str, specs: dict[str, dict[str, Any]],
            expected: dict[str, dict[str, str]]) -> list[str]:
    """What differs from the expectation: a spec that ran (not skipped) must end as
    expected[name][handler] says, "passed" when the file does not name it."""
    problems = []
    for name, s in sorted(specs.items()):
        got = outcome(s["state"])
        if got in ("skipped", "pending"):
            continue
        want = expected.get(name, {}).get(handler, "passed")
        if got != want:
            first = s["message"].splitlines()[0] if s["message"] else ""
            problems.append(f"{handler}: {name}: {got}, expected {want} {first}".rstrip())
    for name, e in sorted(expected.items()):
        if handler in e and name not in specs:
            problems.append(f"{handler}: {name}: in {EXPECTED.name} but not in critest's list")
    return problems


# ---------------------------------------------------------------- the run


def run_critest(env: CriEnv, critest: Path, handler: str, workdir: Path,
                ginkgo: list[str]) -> tuple[dict[str, dict[str, Any]], float]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir()
    report = workdir / "report.json"
    assert env.proc is not None
    cmd = ["nsenter", f"--ipc=/proc/{env.proc.pid}/ns/ipc", "--", str(critest),
           f"-runtime-endpoint=unix://{env.sock}", f"-image-endpoint=unix://{env.sock}",
           f"-runtime-handler={handler}", "-ginkgo.no-color", "-ginkgo.v",
           f"-ginkgo.json-report={report}", "-ginkgo.timeout=60m", *ginkgo]
    # critest's temporary directories (pod logs, volumes, seccomp profiles) under ours.
    child_env = {**os.environ, "TMPDIR": str(workdir / "tmp")}
    started = time.monotonic()
    with open(workdir / "critest.log", "wb") as log:
        subprocess.run(cmd, cwd=workdir, env=child_env, stdin=subprocess.DEVNULL,
                       stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if not report.is_file():
        tail = (workdir / "critest.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"critest ({handler}) wrote no report:\n{tail}")
    return parse_report(report), seconds


def leftovers(env: CriEnv) -> list[str]:
    """Pods or containers critest left in containerd (its specs remove their own)."""
    found = []
    for kind in ("pods", "ps"):
        res = env.crictl_run(kind, "-q", *(["-a"] if kind == "ps" else []))
        if res.stdout.split():
            found.append(f"{kind}: {res.stdout.split()}")
    return found


def git_commit() -> str:
    res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    return res.stdout.strip() + ("+dirty src" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--handlers", default="uspawn,runc,uspawn-pods",
                    help="comma-separated runtime handlers, run in this order")
    ap.add_argument("--runtime", default=os.environ.get("USPAWN_CRI_RUNTIME")
                    or str(REPO / ".venv" / "bin" / "uspawn-runc"),
                    help="the binary of the uspawn handler")
    ap.add_argument("--pods-runtime", default=os.environ.get("USPAWN_CRI_PODS_RUNTIME")
                    or str(REPO / ".venv" / "bin" / "uspawn-runc-pods"),
                    help="the binary of the uspawn-pods handler (every pod in a user "
                    "namespace of its own)")
    ap.add_argument("--expected", type=Path, default=EXPECTED)
    ap.add_argument("--out", type=Path, help="keep the reports and a summary.json here")
    ap.add_argument("--focus", action="append", default=[], help="ginkgo focus regexp")
    ap.add_argument("--skip", action="append", default=[], help="ginkgo skip regexp")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("critest: needs root")
    for tool in ("containerd", "containerd-shim-runc-v2", "docker-registry", "nsenter"):
        if shutil.which(tool) is None:
            raise SystemExit(f"critest: {tool} missing")
    handlers = [h for h in args.handlers.split(",") if h]
    runc = shutil.which("runc")
    if "runc" in handlers and runc is None:
        raise SystemExit("critest: runc missing (apt-get install runc)")
    expected = json.loads(args.expected.read_text())["specs"]
    ginkgo = [f"-ginkgo.focus={f}" for f in args.focus] + \
        [f"-ginkgo.skip={s}" for s in args.skip]
    tools = ensure_tools(tools_src())
    commit = git_commit()  # at the start: others may commit while it runs

    root = Path(tempfile.mkdtemp(prefix="uspawn-critest-", dir="/tmp"))
    root.chmod(0o755)
    registry = Registry(root / "registry")
    env: CriEnv | None = None
    runs: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    teardown: list[str] = []
    try:
        registry.start()
        work = root / "images"
        work.mkdir()
        rootfs = work / "busybox"
        build_busybox_rootfs(str(rootfs))
        swap_busybox(rootfs, debian_busybox(work / "busybox-deb"))
        images: ImageSet = build_images(rootfs, critest_images(build_stub(work / "stub")))
        for name in images.manifests:
            registry.push(images, name)
        shutil.rmtree(work)
        env = CriEnv(root, tools / "crictl", args.runtime, runc, sandbox_image=PAUSE,
                     registry_mirrors={host: registry.url for host in MIRRORED},
                     host_address=True, private_ipc=True,
                     uspawn_runc_pods=args.pods_runtime)
        env.start()
        for handler in handlers:
            print(f"critest: handler {handler} ...", file=sys.stderr, flush=True)
            specs, seconds = run_critest(env, tools / "critest", handler, root / handler,
                                         ginkgo)
            left = leftovers(env)
            teardown += [f"{handler}: left in containerd: {x}" for x in left]
            teardown += [f"{handler}: {p}" for p in env.remove_all_pods()]
            runs[handler] = {"seconds": round(seconds), "totals": totals(specs),
                             "specs": specs}
            problems += compare(handler, specs, expected)
            t = runs[handler]["totals"]
            print(f"critest {handler}: {t['passed']} passed, {t['failed']} failed, "
                  f"{t['skipped']} skipped ({len(specs)} specs, {seconds:.0f} s)", flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                for f in ("report.json", "critest.log"):
                    shutil.copy(root / handler / f, args.out / f"{handler}-{f}")
    finally:
        registry.stop()
        if env is not None:
            teardown += env.stop()
        else:
            shutil.rmtree(root, ignore_errors=True)
        if mounts_matching([str(root)]):
            teardown.append(f"mounts left under {root}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = {"date": datetime.datetime.now(datetime.UTC).isoformat(
                       timespec="seconds"),
                   "commit": commit, "critest": CRITEST_VERSION,
                   "handlers": runs, "mismatches": problems, "teardown": teardown}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    # Every spec that failed, with the first line of its message: with the handler's
    # comparison below, enough to update the expectation file or the docs.
    for handler, run in runs.items():
        for name, s in sorted(run["specs"].items()):
            if outcome(s["state"]) == "failed":
                first = s["message"].splitlines()[0] if s["message"] else ""
                print(f"  {handler} FAIL {name}: {first[:200]}")
    for p in teardown:
        print(f"teardown: {p}")
    if problems:
        print("\nnot as expected:\n  " + "\n  ".join(problems))
        return 1
    print(f"\nall as {args.expected.name} expects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
