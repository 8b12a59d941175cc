"""Build qrm's vcsim (a vSphere API simulator) offline from Debian's govmomi sources.

No Debian or PyPI package ships a vcsim binary, but Debian 12's
``golang-github-vmware-govmomi-dev`` ships govmomi 0.24.2's ``simulator``
library, and ``golang-go`` compiles it. This module copies those sources into
a private GOPATH, applies the simulator fixes qrm's tests need (each one is
an exact text replacement that must apply, or the build fails), and builds
``main.go`` beside this file with no network (GOPATH mode, no module proxy,
no cgo)::

    python plugins/qrm_vmware/tests/vcsim/vcsimbuild.py OUTPUT_BINARY

The tests build it through :func:`cached_binary` (once per cache key, shared
by every test session of a checkout; see conftest.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOCODE = Path("/usr/share/gocode/src")
SIMULATOR = Path("github.com/vmware/govmomi/simulator")
PACKAGES = ("golang-go", "golang-github-vmware-govmomi-dev")


@dataclass(frozen=True)
class Fix:
    """One change to a simulator source file: ``old`` must occur exactly ``count`` times."""

    path: str
    why: str
    old: str
    new: str
    count: int = 1


FIXES = (
    Fix(
        "property_collector.go",
        # pyvmomi >= 8 reads single properties with the internal Fetch method.
        # For a property that is unset (vm.snapshot of a VM without snapshots)
        # govmomi 0.24.2 indexes an empty MissingSet and the request panics,
        # which the client sees as a dropped connection. vCenter answers with
        # no value; so does this.
        "Fetch of an unset property panics instead of returning nothing",
        "\tif len(obj.PropSet) == 0 {\n\t\tfault := obj.MissingSet[0].Fault\n",
        "\tif len(obj.PropSet) == 0 {\n"
        "\t\tif len(obj.MissingSet) == 0 {\n"
        "\t\t\tbody.Res = &internal.FetchResponse{} // unset: no value\n"
        "\t\t\treturn body\n"
        "\t\t}\n"
        "\t\tfault := obj.MissingSet[0].Fault\n",
    ),
    Fix(
        "snapshot.go",
        # The tasks of RemoveSnapshot and RevertToSnapshot named the snapshot
        # as TaskInfo.entity; vCenter names the VM (a ManagedEntity), and
        # pyvmomi refuses a snapshot there.
        "snapshot tasks name the snapshot instead of the VM as their entity",
        'CreateTask(v, "removeSnapshot"',
        'CreateTask(v.Vm, "removeSnapshot"',
    ),
    Fix(
        "snapshot.go",
        "snapshot tasks name the snapshot instead of the VM as their entity",
        'CreateTask(v, "revertToSnapshot"',
        'CreateTask(v.Vm, "revertToSnapshot"',
    ),
    Fix(
        "virtual_machine.go",
        # RelocateVM_Task changed vm.resourcePool but removed the *pool* from
        # the pool's own VM list (a no-op) and never added the VM to the new
        # pool: ResourcePool.vm was wrong after every migration.
        "a relocated VM stays in its old resource pool's VM list",
        "\t\t\tpool := Map.Get(*ref).(*ResourcePool)\n\t\t\tMap.RemoveReference(pool, &pool.Vm, *ref)\n",
        "\t\t\tpool := Map.Get(*ref).(*ResourcePool)\n"
        "\t\t\tif vm.ResourcePool != nil {\n"
        "\t\t\t\tif from, ok := Map.Get(*vm.ResourcePool).(*ResourcePool); ok {\n"
        "\t\t\t\t\tMap.RemoveReference(from, &from.Vm, vm.Self)\n"
        "\t\t\t\t}\n"
        "\t\t\t}\n"
        "\t\t\tMap.AddReference(pool, &pool.Vm, vm.Self)\n",
    ),
    Fix(
        "virtual_machine.go",
        # The same for hosts: HostSystem.vm (what a host runs, and what
        # qrm's inventory reads) did not follow a vMotion.
        "a relocated VM stays in its old host's VM list",
        "\t\t\thost := Map.Get(*ref).(*HostSystem)\n\t\t\tMap.RemoveReference(host, &host.Vm, *ref)\n",
        "\t\t\thost := Map.Get(*ref).(*HostSystem)\n"
        "\t\t\tif vm.Runtime.Host != nil {\n"
        "\t\t\t\tif from, ok := Map.Get(*vm.Runtime.Host).(*HostSystem); ok {\n"
        "\t\t\t\t\tMap.RemoveReference(from, &from.Vm, vm.Self)\n"
        "\t\t\t\t}\n"
        "\t\t\t}\n"
        "\t\t\tMap.AddReference(host, &host.Vm, vm.Self)\n",
    ),
    Fix(
        "host_system.go",
        # Destroying a host removed it from the registry but left it in its
        # cluster's (or standalone compute resource's) host list, so every
        # later ContainerView of hosts listed an object that no longer
        # exists and reading it failed. vCenter takes it out of the cluster;
        # a standalone host goes together with its compute resource.
        "a destroyed host stays listed in its cluster",
        '\t\tf := Map.getEntityParent(h, "Folder").(*Folder)\n'
        "\t\tfolderRemoveChild(ctx, &f.Folder, h.Reference())\n",
        '\t\tf := Map.getEntityParent(h, "Folder").(*Folder)\n'
        "\t\tswitch parent := Map.Get(*h.Parent).(type) {\n"
        "\t\tcase *ClusterComputeResource:\n"
        "\t\t\tMap.RemoveReference(parent, &parent.Host, h.Self)\n"
        "\t\t\tfolderRemoveChild(ctx, &f.Folder, h.Reference())\n"
        "\t\tcase *mo.ComputeResource:\n"
        "\t\t\tMap.Remove(h.Self)\n"
        "\t\t\tfolderRemoveChild(ctx, &f.Folder, parent)\n"
        "\t\tdefault:\n"
        "\t\t\tfolderRemoveChild(ctx, &f.Folder, h.Reference())\n"
        "\t\t}\n",
    ),
    Fix(
        "property_collector.go",
        # RetrievePropertiesEx ignored RetrieveOptions.maxObjects and always
        # answered with everything in one page, and ContinueRetrievePropertiesEx
        # did not exist: a client's paging loop was never exercised. vCenter
        # pages big results (its own limit, or maxObjects) and hands a token.
        "RetrievePropertiesEx does not page",
        "\t\tres.Objects = objects\n"
        "\t\tbody.Res = &types.RetrievePropertiesExResponse{\n"
        "\t\t\tReturnval: res,\n"
        "\t\t}\n",
        "\t\tres.Objects = objects\n"
        "\t\tvar max int32\n"
        "\t\tif r.Options.MaxObjects > 0 {\n"
        "\t\t\tmax = r.Options.MaxObjects\n"
        "\t\t}\n"
        "\t\tbody.Res = &types.RetrievePropertiesExResponse{\n"
        "\t\t\tReturnval: qrmPage(res.Objects, max),\n"
        "\t\t}\n",
    ),
    Fix(
        "task.go",
        # Every simulated task finished before its method returned, so a
        # client never waited for a running task (nor timed out on one).
        # Renamed so that zz_qrm_task_delay.go's Run can let chosen tasks
        # run for a while, as vCenter's do.
        "tasks are always finished when their method returns",
        "func (t *Task) Run() types.ManagedObjectReference {\n",
        "func (t *Task) qrmRun() types.ManagedObjectReference {\n",
    ),
)

# MigrateVM_Task (the vMotion call of every vSphere release) is missing from
# the simulator; served here as the RelocateVM_Task it is equivalent to for a
# host and pool change.
MIGRATE_VM = """\
package simulator

// Added by qrm's vcsim build (plugins/qrm_vmware/tests/vcsim/vcsimbuild.py).

import (
\t"github.com/vmware/govmomi/vim25/methods"
\t"github.com/vmware/govmomi/vim25/soap"
\t"github.com/vmware/govmomi/vim25/types"
)

func (vm *VirtualMachine) MigrateVMTask(ctx *Context, req *types.MigrateVM_Task) soap.HasFault {
\trelocated := vm.RelocateVMTask(ctx, &types.RelocateVM_Task{
\t\tThis: req.This,
\t\tSpec: types.VirtualMachineRelocateSpec{Host: req.Host, Pool: req.Pool},
\t})
\tbody, ok := relocated.(*methods.RelocateVM_TaskBody)
\tif !ok || body.Res == nil {
\t\treturn relocated
\t}
\treturn &methods.MigrateVM_TaskBody{Res: &types.MigrateVM_TaskResponse{Returnval: body.Res.Returnval}}
}
"""


# DisconnectHost_Task and ReconnectHost_Task are missing too: with them a test
# can make vCenter lose a host (runtime.connectionState) and get it back.
HOST_CONNECTION = """\
package simulator

// Added by qrm's vcsim build (plugins/qrm_vmware/tests/vcsim/vcsimbuild.py).

import (
\t"github.com/vmware/govmomi/vim25/methods"
\t"github.com/vmware/govmomi/vim25/soap"
\t"github.com/vmware/govmomi/vim25/types"
)

func (h *HostSystem) setConnectionState(state types.HostSystemConnectionState) {
\tMap.Update(h, []types.PropertyChange{{Name: "runtime.connectionState", Val: state}})
}

func (h *HostSystem) DisconnectHostTask(ctx *Context, req *types.DisconnectHost_Task) soap.HasFault {
\ttask := CreateTask(h, "disconnectHost", func(*Task) (types.AnyType, types.BaseMethodFault) {
\t\th.setConnectionState(types.HostSystemConnectionStateDisconnected)
\t\treturn nil, nil
\t})
\treturn &methods.DisconnectHost_TaskBody{Res: &types.DisconnectHost_TaskResponse{Returnval: task.Run()}}
}

func (h *HostSystem) ReconnectHostTask(ctx *Context, req *types.ReconnectHost_Task) soap.HasFault {
\ttask := CreateTask(h, "reconnectHost", func(*Task) (types.AnyType, types.BaseMethodFault) {
\t\th.setConnectionState(types.HostSystemConnectionStateConnected)
\t\treturn nil, nil
\t})
\treturn &methods.ReconnectHost_TaskBody{Res: &types.ReconnectHost_TaskResponse{Returnval: task.Run()}}
}
"""


# The pages RetrievePropertiesEx holds back, and ContinueRetrievePropertiesEx
# and CancelRetrievePropertiesEx that hand them out or drop them.
PAGING = """\
package simulator

// Added by qrm's vcsim build (plugins/qrm_vmware/tests/vcsim/vcsimbuild.py).

import (
\t"fmt"
\t"sync"

\t"github.com/vmware/govmomi/vim25/methods"
\t"github.com/vmware/govmomi/vim25/soap"
\t"github.com/vmware/govmomi/vim25/types"
)

type qrmHeldPage struct {
\tobjects []types.ObjectContent
\tmax     int32
}

var qrmPages = struct {
\tsync.Mutex
\theld map[string]qrmHeldPage
\tnext int
}{held: map[string]qrmHeldPage{}}

// qrmPage answers the first max objects (all with max 0) and keeps the rest under a token.
func qrmPage(objects []types.ObjectContent, max int32) *types.RetrieveResult {
\tif max <= 0 || int(max) >= len(objects) {
\t\treturn &types.RetrieveResult{Objects: objects}
\t}
\tqrmPages.Lock()
\tdefer qrmPages.Unlock()
\tqrmPages.next++
\ttoken := fmt.Sprintf("qrm-page-%d", qrmPages.next)
\tqrmPages.held[token] = qrmHeldPage{objects: objects[max:], max: max}
\treturn &types.RetrieveResult{Token: token, Objects: objects[:max]}
}

func (pc *PropertyCollector) ContinueRetrievePropertiesEx(ctx *Context, r *types.ContinueRetrievePropertiesEx) soap.HasFault {
\tbody := &methods.ContinueRetrievePropertiesExBody{}
\tqrmPages.Lock()
\tpage, ok := qrmPages.held[r.Token]
\tdelete(qrmPages.held, r.Token)
\tqrmPages.Unlock()
\tif !ok {
\t\tbody.Fault_ = Fault("unknown token", &types.InvalidArgument{InvalidProperty: "token"})
\t\treturn body
\t}
\tbody.Res = &types.ContinueRetrievePropertiesExResponse{Returnval: *qrmPage(page.objects, page.max)}
\treturn body
}

func (pc *PropertyCollector) CancelRetrievePropertiesEx(ctx *Context, r *types.CancelRetrievePropertiesEx) soap.HasFault {
\tqrmPages.Lock()
\tdelete(qrmPages.held, r.Token)
\tqrmPages.Unlock()
\treturn &methods.CancelRetrievePropertiesExBody{Res: new(types.CancelRetrievePropertiesExResponse)}
}
"""


# Tasks that take time: QrmTaskDelay("powerOn", 3*time.Second) makes every
# powerOn task run for 3 s (the launcher's POST /qrm/task-delay sets it).
TASK_DELAY = """\
package simulator

// Added by qrm's vcsim build (plugins/qrm_vmware/tests/vcsim/vcsimbuild.py).

import (
\t"strings"
\t"sync"
\t"time"

\t"github.com/vmware/govmomi/vim25/types"
)

var qrmTaskDelays = struct {
\tsync.Mutex
\tby map[string]time.Duration
}{by: map[string]time.Duration{}}

// QrmTaskDelay makes the tasks whose descriptionId ends in "."+id run for d (0: at once).
func QrmTaskDelay(id string, d time.Duration) {
\tqrmTaskDelays.Lock()
\tdefer qrmTaskDelays.Unlock()
\tif d <= 0 {
\t\tdelete(qrmTaskDelays.by, id)
\t\treturn
\t}
\tqrmTaskDelays.by[id] = d
}

func (t *Task) Run() types.ManagedObjectReference {
\tid := t.Info.DescriptionId
\tif i := strings.LastIndex(id, "."); i >= 0 {
\t\tid = id[i+1:]
\t}
\tqrmTaskDelays.Lock()
\td := qrmTaskDelays.by[id]
\tqrmTaskDelays.Unlock()
\tif d <= 0 {
\t\treturn t.qrmRun()
\t}
\tMap.Update(t, []types.PropertyChange{
\t\t{Name: "info.startTime", Val: time.Now()},
\t\t{Name: "info.state", Val: types.TaskInfoStateRunning},
\t})
\tgo func() {
\t\ttime.Sleep(d)
\t\tt.qrmRun()
\t}()
\treturn t.Self
}
"""


class BuildError(RuntimeError):
    pass


def missing_packages() -> list[str]:
    """The Debian packages the build needs that are not installed."""
    missing = []
    if shutil.which("go") is None:
        missing.append("golang-go")
    if not (GOCODE / SIMULATOR).is_dir():
        missing.append("golang-github-vmware-govmomi-dev")
    return missing


def _package_versions() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package}=${Version}\\n", *PACKAGES],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        out = ""
    return out.strip()


def cache_key() -> str:
    """Changes whenever the launcher, the fixes or the Debian sources change."""
    digest = hashlib.sha256()
    for path in (HERE / "main.go", Path(__file__).resolve()):
        digest.update(path.read_bytes())
    digest.update(_package_versions().encode())
    return digest.hexdigest()[:16]


def apply_fixes(simulator: Path) -> None:
    for fix in FIXES:
        path = simulator / fix.path
        text = path.read_text()
        found = text.count(fix.old)
        if found != fix.count:
            raise BuildError(
                f"vcsim fix '{fix.why}' does not apply to {fix.path}: its text occurs {found} times, "
                f"not {fix.count} (did the govmomi package change?)"
            )
        path.write_text(text.replace(fix.old, fix.new))
    (simulator / "zz_qrm_migrate_vm.go").write_text(MIGRATE_VM)
    (simulator / "zz_qrm_host_connection.go").write_text(HOST_CONNECTION)
    (simulator / "zz_qrm_paging.go").write_text(PAGING)
    (simulator / "zz_qrm_task_delay.go").write_text(TASK_DELAY)


def build(output: Path, *, gocache: Path | None = None) -> Path:
    """Compile vcsim to ``output`` (atomically: a half-written binary never appears there)."""
    missing = missing_packages()
    if missing:
        raise BuildError("building vcsim needs the Debian packages " + " ".join(missing))
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qrm-vcsim-build-") as tmp:
        work = Path(tmp)
        gopath = work / "gopath"
        shutil.copytree(GOCODE / "github.com", gopath / "src" / "github.com", symlinks=True)
        apply_fixes(gopath / "src" / SIMULATOR)
        main = gopath / "src" / "qrm-vcsim"
        main.mkdir()
        shutil.copy(HERE / "main.go", main / "main.go")
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": str(gopath),
            "GOFLAGS": "",
            "GOPROXY": "off",
            "CGO_ENABLED": "0",
            "GOCACHE": str(gocache or work / "gocache"),
            "HOME": os.environ.get("HOME", tmp),
        }
        partial = output.with_name(output.name + f".{os.getpid()}.part")
        result = subprocess.run(
            ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), "."],
            cwd=main,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BuildError("go build of vcsim failed:\n" + (result.stderr or result.stdout).strip())
        partial.replace(output)
    return output


def cached_binary(cache_dir: Path) -> Path:
    """``cache_dir/<key>/vcsim``, built if it is not there yet (safe when several
    test sessions ask at once: each builds to a private name and renames)."""
    target = cache_dir / cache_key() / "vcsim"
    if target.exists():
        return target
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        if not target.exists():
            build(target, gocache=cache_dir / "gocache")
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: vcsimbuild.py OUTPUT_BINARY")
    try:
        print(build(Path(sys.argv[1])))
    except BuildError as exc:
        sys.exit(str(exc))
