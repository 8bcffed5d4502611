"""Build the VM toolchain: QEMU 11.1 from trixie-backports, a guest kernel and a guest root image.

Everything lands in a cache directory outside the repository (``$VIRTIO_EMU_CACHE``, default
``~/.cache/virtio-emu``) so fresh clones on the same machine reuse it. Each step writes a stamp
holding the hash of its recipe (chained to the stamps of the steps it builds on) and is skipped
while that hash matches, so only the cheap image step reruns when the guest tools or the agent
change. Steps build into a temporary directory and are renamed into place when complete, so an
interrupted build never leaves a half-made root behind a valid stamp.

Run ``python -m vm.toolchain`` (the Makefile's ``toolchain`` target); ``--force STEP`` rebuilds one
step again even
if its stamp matches (downstream steps follow only if their recipe hash changes).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
VM_DIR = Path(__file__).resolve().parent
SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
# Debian package -> what shows it is installed (a program on PATH or an absolute path). make and
# a C toolchain serve `make -C guest-tools install`, which compiles the guest's helper library.
HOST_PACKAGES = {
    "debootstrap": "debootstrap",
    "e2fsprogs": "mke2fs",
    "make": "make",
    "gcc": "cc",
    "libc6-dev": "/usr/include/stdio.h",
}
QEMU_PACKAGES = ("qemu-system-x86", "qemu-utils", "virtiofsd")
GUEST_PACKAGES = (
    "linux-image-amd64",
    "python3",
    "python3-cffi",
    "python3-pyudev",
    "udev",
    "kmod",
    "pciutils",
    "fio",
)
HOST_ROOT_DIR = "host-root"
IMAGE_SIZE = "1G"
IMAGE_LABEL = "guestroot"
KEEP_IMAGES = 4
AGENT_PATH_IN_GUEST = "/usr/local/lib/virtio-emu/agent.py"
INIT_PATH_IN_GUEST = "/usr/local/sbin/virtio-emu-init"
# Bump when a step's procedure changes in a way its recipe does not capture.
RECIPE_VERSION = 1


class ToolchainError(Exception):
    """A build step failed; the message names the step and what to do about it."""

    def __init__(self, step: str, message: str, hint: str = "") -> None:
        self.step = step
        self.hint = hint
        text = f"toolchain step {step!r} failed: {message}"
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


def default_cache_dir() -> Path:
    """The cache lives outside the repo so every clone on the machine shares one build."""
    env = os.environ.get("VIRTIO_EMU_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "virtio-emu"


@dataclass(frozen=True, slots=True)
class Toolchain:
    """Paths of a built toolchain; what vm.qemu and vm.guest consume.

    Images live in ``images/<digest>``: clones whose guest tools differ each keep their own image
    instead of rebuilding one shared file under each other's running guests.
    """

    cache: Path
    image_digest: str

    @property
    def host_root(self) -> Path:
        """The trixie root holding QEMU, qemu-storage-daemon and virtiofsd."""
        return self.cache / HOST_ROOT_DIR

    @property
    def guest_root(self) -> Path:
        return self.cache / "guest-root"

    @property
    def image_dir(self) -> Path:
        return self.cache / "images" / self.image_digest

    @property
    def rootfs(self) -> Path:
        return self.image_dir / "rootfs.ext4"

    @property
    def kernel(self) -> Path:
        return self.image_dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.image_dir / "initrd.img"

    @property
    def manifest(self) -> Path:
        return self.image_dir / "manifest.json"

    @property
    def init_path(self) -> str:
        """The guest's PID 1 (passed as ``init=``)."""
        return INIT_PATH_IN_GUEST

    def is_built(self) -> bool:
        return (
            all(p.exists() for p in (self.rootfs, self.kernel, self.initrd, self.manifest))
            and (self.host_root / "usr/bin/qemu-system-x86_64").exists()
        )

    def read_manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.manifest.read_text())
        return data


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """How to run a build; ``force`` names steps whose stamps are ignored."""

    cache: Path
    force: frozenset[str] = frozenset()
    progress: Callable[[str], None] = field(default=print)


# --- helpers -------------------------------------------------------------------------------


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _hash_tree(root: Path, skip_dirs: frozenset[str], skip_suffixes: tuple[str, ...]) -> str:
    """Content hash of a source tree, ignoring build products that change on every build."""
    h = hashlib.sha256()
    if not root.is_dir():
        return "absent"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            if name.endswith(skip_suffixes):
                continue
            path = Path(dirpath) / name
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(oct(path.stat().st_mode & 0o111).encode())
            h.update(path.read_bytes() if not path.is_symlink() else os.readlink(path).encode())
    return h.hexdigest()[:16]


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (so they unmount in order)."""
    found = []
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(Path(mnt))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -rf that first unmounts anything a crashed build left mounted inside (e.g. /proc)."""
    if not path.exists() and not path.is_symlink():
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    if _mounts_under(path):
        raise ToolchainError("cleanup", f"{path} still has mounts inside; refusing to delete it")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def _proc_mounted(root: Path) -> Iterator[None]:
    """Mount /proc in a chroot for package scripts; always unmount it again."""
    target = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


class _Runner:
    """Runs a step's commands with output in a per-step log, kept for the failure message."""

    def __init__(self, step: str, log_path: Path) -> None:
        self.step = step
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")  # noqa: SIM115 -- closed in close()

    def close(self) -> None:
        self._log.close()

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def run(self, argv: Sequence[str], hint: str = "", env: dict[str, str] | None = None) -> None:
        self._log.write(f"$ {' '.join(argv)}\n")
        self._log.flush()
        try:
            proc = subprocess.run(
                list(argv),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                check=False,
            )
        except FileNotFoundError as exc:
            raise ToolchainError(self.step, f"{argv[0]} not found", hint) from exc
        if proc.returncode != 0:
            raise ToolchainError(
                self.step,
                f"`{' '.join(argv[:4])} ...` exited {proc.returncode}; "
                f"log {self.log_path}, last lines:\n{self.tail()}",
                hint,
            )

    def chroot(self, root: Path, argv: Sequence[str], hint: str = "") -> None:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C",
            "HOME": "/root",
        }
        self.run(["chroot", str(root), *argv], hint=hint, env=env)


# --- the steps -----------------------------------------------------------------------------


class Builder:
    """Runs the steps in order, each skipped while its stamp matches its recipe hash."""

    def __init__(self, options: BuildOptions) -> None:
        self.opts = options
        self.cache = options.cache
        self.stamps = self.cache / "stamps"
        self.logs = self.cache / "logs"

    def _say(self, text: str) -> None:
        self.opts.progress(f"[toolchain] {text}")

    def _stamp_ok(self, step: str, digest: str, output: Path) -> bool:
        if step in self.opts.force:
            return False
        if output.name == digest:  # a directory named by its digest is its own stamp
            return output.exists()
        stamp = self.stamps / step
        return output.exists() and stamp.exists() and stamp.read_text().strip() == digest

    def _write_stamp(self, step: str, digest: str) -> None:
        self.stamps.mkdir(parents=True, exist_ok=True)
        (self.stamps / step).write_text(digest + "\n")

    def _step(
        self, step: str, digest: str, output: Path, what: str, build: Callable[[], None]
    ) -> None:
        if self._stamp_ok(step, digest, output):
            self._say(f"{step}: up to date ({digest})")
            return
        self._say(f"{step}: {what} ...")
        start = time.monotonic()
        (self.stamps / step).unlink(missing_ok=True)
        build()
        self._write_stamp(step, digest)
        self._say(f"{step}: done in {time.monotonic() - start:.1f}s ({digest})")

    def build(self) -> Toolchain:
        if os.geteuid() != 0:
            raise ToolchainError(
                "preflight", "needs root (debootstrap, chroot and mount)", "run it as root"
            )
        self.cache.mkdir(parents=True, exist_ok=True)
        lock_path = self.cache / ".lock"
        with open(lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._say(f"waiting for another build holding {lock_path}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._host_packages()
            base = self._base_root()
            host = self._host_root(base)
            guest = self._guest_root(base)
            return self._image(guest, host)

    def _host_packages(self) -> None:
        missing = sorted(
            pkg
            for pkg, probe in HOST_PACKAGES.items()
            if not (Path(probe).exists() if probe.startswith("/") else shutil.which(probe))
        )
        if not missing:
            self._say("host-packages: present")
            return
        self._say(f"host-packages: installing {' '.join(missing)} ...")
        start = time.monotonic()
        runner = _Runner("host-packages", self.logs / "host-packages.log")
        hint = f"install them by hand: apt-get install --no-install-recommends {' '.join(missing)}"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            runner.run(["apt-get", "update"], hint=hint, env=env)
            runner.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *missing],
                hint=hint,
                env=env,
            )
        finally:
            runner.close()
        self._say(f"host-packages: done in {time.monotonic() - start:.1f}s")

    def _base_root(self) -> str:
        digest = _hash("base", RECIPE_VERSION, SUITE, MIRROR, "minbase")
        out = self.cache / "base-root"

        def build() -> None:
            tmp = self.cache / "base-root.tmp"
            _remove_tree(tmp)
            runner = _Runner("base-root", self.logs / "base-root.log")
            argv = ["debootstrap", "--variant=minbase", SUITE, str(tmp), MIRROR]
            hint = (
                f"check that {MIRROR} is reachable and that debootstrap knows {SUITE} "
                "(install a newer debootstrap and debian-archive-keyring if not)"
            )
            try:
                try:
                    runner.run(argv, hint=hint)
                except ToolchainError:
                    self._say("base-root: debootstrap failed, retrying once from scratch")
                    _remove_tree(tmp)
                    runner.run(argv, hint=hint)
                _prepare_root(tmp)
            finally:
                runner.close()
            _remove_tree(out)
            tmp.rename(out)

        self._step("base-root", digest, out, f"debootstrap {SUITE}", build)
        return digest

    def _derived_root(
        self,
        step: str,
        parent: str,
        packages: Sequence[str],
        apt_argv: Sequence[str],
        check: Callable[[Path, _Runner], None],
    ) -> str:
        digest = _hash(step, RECIPE_VERSION, parent, list(apt_argv))
        out = self.cache / step

        def build() -> None:
            tmp = self.cache / f"{step}.tmp"
            _remove_tree(tmp)
            runner = _Runner(step, self.logs / f"{step}.log")
            hint = f"check that {MIRROR} is reachable; the full apt output is in the log"
            try:
                runner.run(["cp", "-a", str(self.cache / "base-root"), str(tmp)])
                with _proc_mounted(tmp):
                    runner.chroot(tmp, ["apt-get", "update"], hint=hint)
                    runner.chroot(tmp, apt_argv, hint=hint)
                    runner.chroot(tmp, ["apt-get", "clean"])
                _clean_root(tmp)
                check(tmp, runner)
            finally:
                runner.close()
            _remove_tree(out)
            tmp.rename(out)

        self._step(step, digest, out, f"apt-get install {' '.join(packages)}", build)
        return digest

    def _host_root(self, base: str) -> str:
        argv = [
            "apt-get", "install", "-y", "--no-install-recommends",
            "-t", f"{SUITE}-backports", *QEMU_PACKAGES,
        ]  # fmt: skip

        def check(root: Path, runner: _Runner) -> None:
            for rel in ("usr/bin/qemu-system-x86_64", "usr/bin/qemu-storage-daemon",
                        "usr/libexec/virtiofsd"):  # fmt: skip
                if not (root / rel).exists():
                    raise ToolchainError("host-root", f"/{rel} missing after install")

        return self._derived_root("host-root", base, QEMU_PACKAGES, argv, check)

    def _guest_root(self, base: str) -> str:
        argv = ["apt-get", "install", "-y", "--no-install-recommends", *GUEST_PACKAGES]

        def check(root: Path, runner: _Runner) -> None:
            if not list((root / "boot").glob("vmlinuz-*")) or not list(
                (root / "boot").glob("initrd.img-*")
            ):
                raise ToolchainError("guest-root", "no kernel or initrd in /boot after install")

        return self._derived_root("guest-root", base, GUEST_PACKAGES, argv, check)

    def _image(self, guest: str, host: str) -> Toolchain:
        tools = _hash_tree(
            REPO_ROOT / "guest-tools",
            # vguest.egg-info: what `pip install -e ./guest-tools` leaves, not a source.
            frozenset({"__pycache__", "build", "vguest.egg-info", ".mypy_cache", ".pytest_cache"}),
            (".pyc", ".so", ".o"),
        )
        agent_inputs = [(VM_DIR / name).read_text() for name in ("agent.py", "guest-init.sh")]
        digest = _hash("image", RECIPE_VERSION, guest, host, tools, agent_inputs, IMAGE_SIZE)
        tc = Toolchain(self.cache, digest)
        out = tc.image_dir

        def build() -> None:
            tmp = self.cache / "image.tmp"
            staging = self.cache / "image-staging"
            _remove_tree(tmp)
            _remove_tree(staging)
            tmp.mkdir()
            runner = _Runner("image", self.logs / "image.log")
            try:
                # Hard links make the copy nearly free; everything below writes new files only.
                runner.run(["cp", "-al", str(tc.guest_root), str(staging)])
                tools_installed = self._install_guest_tools(staging, runner)
                _install_agent(staging)
                runner.run(
                    [
                        "mke2fs",
                        "-q",
                        "-t",
                        "ext4",
                        "-L",
                        IMAGE_LABEL,
                        "-d",
                        str(staging),
                        str(tmp / "rootfs.ext4"),
                        IMAGE_SIZE,
                    ],
                    hint="needs e2fsprogs >= 1.43 (mke2fs -d); grow IMAGE_SIZE if it is full",
                )
                kernel = sorted((staging / "boot").glob("vmlinuz-*"))[-1]
                initrd = sorted((staging / "boot").glob("initrd.img-*"))[-1]
                shutil.copyfile(kernel, tmp / "vmlinuz")
                shutil.copyfile(initrd, tmp / "initrd.img")
                manifest = {
                    "digest": digest,
                    "kernel_release": kernel.name.removeprefix("vmlinuz-"),
                    "qemu_version": _qemu_version(tc.host_root),
                    "guest_tools": tools_installed,
                    "label": IMAGE_LABEL,
                    "init": INIT_PATH_IN_GUEST,
                }
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            finally:
                runner.close()
                _remove_tree(staging)
            _remove_tree(out)
            out.parent.mkdir(exist_ok=True)
            tmp.rename(out)
            self._prune_images(keep=out)

        self._step("image", digest, out, "guest image (rootfs.ext4, vmlinuz, initrd)", build)
        os.utime(out)  # most recently used last, for pruning
        return tc

    def _prune_images(self, keep: Path) -> None:
        """Drop all but the most recently used images (and the pre-digest layout's one)."""
        _remove_tree(self.cache / "image")
        others = sorted(
            (p for p in keep.parent.iterdir() if p != keep and p.is_dir()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in others[KEEP_IMAGES - 1 :]:
            _remove_tree(old)

    def _install_guest_tools(self, staging: Path, runner: _Runner) -> bool:
        makefile = REPO_ROOT / "guest-tools" / "Makefile"
        if not makefile.exists() or "install:" not in makefile.read_text():
            self._say("image: WARNING guest-tools has no Makefile install target yet; skipped")
            return False
        runner.run(
            ["make", "-C", str(REPO_ROOT / "guest-tools"), "install", f"DESTDIR={staging}"],
            hint="`make -C guest-tools install DESTDIR=...` failed; see the log",
        )
        return True


def _prepare_root(root: Path) -> None:
    """Sources for trixie, -updates and -backports; no daemons started by package scripts."""
    sources = root / "etc/apt/sources.list"
    lines = [ln for ln in sources.read_text().splitlines() if ln.startswith("deb ")]
    if not lines:
        raise ToolchainError("base-root", f"no deb line in {sources} written by debootstrap")
    first = lines[0].split()
    uri, components = first[1], " ".join(first[3:]) or "main"
    sources.write_text(
        "".join(
            f"deb {uri} {suite} {components}\n"
            for suite in (SUITE, f"{SUITE}-updates", f"{SUITE}-backports")
        )
    )
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(
        "#!/bin/sh\n# Package scripts must not start daemons in the build root.\nexit 101\n"
    )
    policy.chmod(0o755)
    (root / "etc/apt/apt.conf.d/90virtio-emu").write_text(
        'APT::Install-Recommends "false";\nAcquire::Retries "3";\n'
    )


def _clean_root(root: Path) -> None:
    """Drop what apt only needs at install time; the roots are rebuilt, never upgraded."""
    for rel in ("var/lib/apt/lists", "var/cache/apt/archives"):
        target = root / rel
        for child in target.iterdir() if target.is_dir() else ():
            if child.is_file() and child.name != "lock":
                child.unlink()
    for rel in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin"):
        (root / rel).unlink(missing_ok=True)


def _install_agent(staging: Path) -> None:
    """The agent and its PID-1 init script, plus the console-free defaults a test guest wants."""
    agent = staging / AGENT_PATH_IN_GUEST.lstrip("/")
    init = staging / INIT_PATH_IN_GUEST.lstrip("/")
    for src, dst in ((VM_DIR / "agent.py", agent), (VM_DIR / "guest-init.sh", init)):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        shutil.copyfile(src, dst)
        dst.chmod(0o755)
    hostname = staging / "etc/hostname"
    hostname.unlink(missing_ok=True)
    hostname.write_text("vguest\n")


def _qemu_version(host_root: Path) -> str:
    from vm.qemu import HostBinaries  # noqa: PLC0415 -- vm.qemu imports this module

    proc = subprocess.run(
        HostBinaries(host_root).qemu_argv("--version"),
        capture_output=True,
        text=True,
        env=HostBinaries(host_root).env(),
        check=False,
    )
    if proc.returncode != 0:
        raise ToolchainError(
            "image",
            f"QEMU from the host root does not run: {proc.stderr.strip()}",
            "rebuild the host root with --force host-root",
        )
    return proc.stdout.splitlines()[0]


def ensure_toolchain(
    cache: Path | None = None, progress: Callable[[str], None] | None = None
) -> Toolchain:
    """Build whatever is missing or stale and return the paths; cheap when all is cached."""
    opts = BuildOptions(cache=cache or default_cache_dir(), progress=progress or log.info)
    return Builder(opts).build()


STEPS = ("base-root", "host-root", "guest-root", "image")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vm.toolchain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cache", type=Path, default=None, help="default $VIRTIO_EMU_CACHE")
    parser.add_argument(
        "--force", action="append", default=[], choices=STEPS,
        help="rebuild this step even if its stamp matches",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = BuildOptions(
        cache=args.cache or default_cache_dir(),
        force=frozenset(args.force),
        progress=lambda line: print(line, flush=True),
    )
    start = time.monotonic()
    try:
        tc = Builder(opts).build()
    except ToolchainError as exc:
        print(f"[toolchain] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    manifest = tc.read_manifest()
    print(
        f"[toolchain] ready in {time.monotonic() - start:.1f}s: {manifest['qemu_version']}, "
        f"kernel {manifest['kernel_release']}, image {tc.rootfs}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
