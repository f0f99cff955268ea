package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/launcher"
	"github.com/stasis-k8s/stasis/wiring"
)

// rig is one pod's worth of test setup: a checkpoint volume, an agent, its local socket.
type rig struct {
	t        testing.TB
	criu     string
	root     string // the checkpoint volume (same path inside the test containers)
	identity string
	agent    *Agent
	finder   pidFinder
	mounts   []Mount // the volume mounts the runtime reports for every container
	attempt  uint32  // the restart count the runtime reports for restoring containers
	socket   string

	pods *fakeRuntimePods // the runtime's view of the restoring pods' containers (serveLocal)
	// setpriv starts the restoring containers (restrictedContainer unless a test sets it).
	setpriv []string
	logs    *syncBuffer // the agent's log

	mu      sync.Mutex
	restore map[string]string // the pod annotations of restoring pods (what CRI's sandbox holds)
	pending sync.Map          // pod UID + "/" + container → chan *container (restoring containers)
}

func newRig(t testing.TB, cfg Config) *rig {
	criu := needCriu(t)
	base := t.TempDir()
	r := &rig{t: t, criu: criu, root: filepath.Join(base, "volume"), identity: "job/default/counter/0",
		finder: pidFinder{}, restore: map[string]string{wiring.AnnotationIdentity: "job/default/counter/0"},
		setpriv: restrictedContainer, logs: &syncBuffer{}}
	cfg.Finder = rigFinder{r}
	cfg.Criu = agentCriu(t, criu)
	cfg.CheckpointMount = r.root
	cfg.ManifestKey = testKey
	cfg.NodeName = "node-a"
	cfg.Log = zerolog.New(io.MultiWriter(zerolog.NewTestWriter(t), r.logs))
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	a, err := New(ctx, cfg)
	require.NoError(t, err)
	r.agent = a
	return r
}

// rigFinder is the CRI finder's stand-in where no container runtime runs: containers by the
// launcher PIDs the test started, and the pod annotations the webhook would have written.
type rigFinder struct{ r *rig }

func (f rigFinder) Find(ctx context.Context, pod agentapi.PodRef, c string) (Target, error) {
	f.r.mu.Lock()
	ann := maps.Clone(f.r.restore)
	f.r.mu.Unlock()
	if v, ok := f.r.pending.Load(pod.UID + "/" + c); ok {
		select {
		case ct := <-v.(chan *container):
			v.(chan *container) <- ct
			return Target{PID: ct.launcherPID(), Image: "counter:test", PodAnnotations: ann, Mounts: f.r.mounts, Attempt: f.r.attempt}, nil
		case <-time.After(10 * time.Second):
			return Target{}, fmt.Errorf("restoring container %q never started", c)
		}
	}
	t, err := f.r.finder.Find(ctx, pod, c)
	t.PodAnnotations, t.Mounts = ann, f.r.mounts
	return t, err
}

// serveLocal starts the agent's local socket (what launchers talk to) for this rig.
func (r *rig) serveLocal() {
	dir := r.t.TempDir()
	ln, err := ListenLocal(dir, wiring.AgentSocketName)
	require.NoError(r.t, err)
	r.pods = newFakeRuntimePods()
	l := NewLocal(r.agent, LocalConfig{Pods: r.pods})
	srv := l.Server()
	go func() { _ = srv.Serve(l.Listener(ln)) }()
	r.t.Cleanup(func() { _ = srv.Close() })
	r.socket = filepath.Join(dir, wiring.AgentSocketName)
}

func (r *rig) dir(container string) string {
	return filepath.Join(r.root, wiring.IdentityDir(r.identity), container)
}

// rigPodUID is the pod UID the rig's dumped launchers report (wiring.EnvPodUID).
const rigPodUID = "5d1f3a9e-0c4b-4e7a-9b2d-6f8e1a2b3c4d"

func (r *rig) env(container string) []string {
	return r.envFor(container, rigPodUID)
}

func (r *rig) envFor(container, uid string) []string {
	return []string{
		wiring.EnvContainerName + "=" + container,
		wiring.EnvPodUID + "=" + uid,
		wiring.EnvPodName + "=counter",
		wiring.EnvPodNamespace + "=default",
		launcher.EnvAgentSocket + "=" + r.socketPath(),
	}
}

// restorePod plays the webhook and the kubelet for a pod created to restore checkpoint id into
// containers: the pod's annotations, then each container started with the launcher's restore
// environment. Each call is a new pod (a new UID).
func (r *rig) restorePod(id string, containers map[string][]string) map[string]*container {
	r.t.Helper()
	ref, err := json.Marshal(wiring.RestoreRef{ID: id, Containers: slices.Sorted(maps.Keys(containers))})
	require.NoError(r.t, err)
	r.mu.Lock()
	r.restore[wiring.AnnotationRestore] = string(ref)
	r.mu.Unlock()
	return r.startPod(id, containers)
}

// startPod plays the kubelet for a new pod (a new UID) of the rig's identity: each container is
// known to the runtime and started in its pod's cgroup with the launcher's environment, and the
// restore environment when id is set. A pod without a restore annotation is a fresh one.
func (r *rig) startPod(id string, containers map[string][]string) map[string]*container {
	r.t.Helper()
	r.mu.Lock()
	r.restore[wiring.AnnotationIdentity] = r.identity
	if id == "" {
		delete(r.restore, wiring.AnnotationRestore)
	}
	r.mu.Unlock()
	h := randomHex(r.t, 32)
	uid := h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
	pod := agentapi.PodRef{Namespace: "default", Name: "counter", UID: uid}
	out := map[string]*container{}
	for name, cmd := range containers {
		// Known to the runtime before it starts (as CRI knows a container before its process
		// runs), in its pod's cgroup: the agent identifies its launcher from the kernel.
		ch := make(chan *container, 1)
		r.pending.Store(uid+"/"+name, ch)
		pid := func() int { c := <-ch; ch <- c; return c.launcherPID() }
		ctr := randomHex(r.t, 64)
		if r.pods != nil {
			r.pods.add(pod, ctr, name, pid)
		}
		env := r.envFor(name, uid)
		if id != "" {
			env = append(env, wiring.EnvRestoreID+"="+id)
		}
		out[name] = startContainerWith(r.t, podCgroup(r.t, uid, ctr), r.setpriv, env, append([]string{"--"}, cmd...)...)
		ch <- out[name]
	}
	return out
}

func (r *rig) socketPath() string {
	if r.socket == "" {
		return filepath.Join(r.root, "no-agent.sock")
	}
	return r.socket
}

// checkpoint runs the agent's dump (the code path behind POST /v1/checkpoints) and waits for it.
func (r *rig) checkpoint(uid string, specs ...agentapi.ContainerSpec) agentapi.CheckpointStatus {
	r.t.Helper()
	_, err := r.agent.Start(agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: "counter", UID: uid}, Containers: specs, Reason: "eviction"})
	require.NoError(r.t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := r.agent.Wait(ctx, uid)
	require.NoError(r.t, err)
	return st
}

// restoreContainer is restorePod for one container.
func (r *rig) restoreContainer(container, id string, cmd ...string) *container {
	r.t.Helper()
	return r.restorePod(id, map[string][]string{container: cmd})[container]
}

// cgroups is /proc/<pid>/cgroup.
func cgroups(t testing.TB, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	require.NoError(t, err)
	return string(b)
}

// credentials are the lines of /proc/<pid>/status a restore must carry over exactly.
func credentials(t testing.TB, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(l, ":")
		switch k {
		case "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters":
			out[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return out
}

func isSequence(nums []int) bool {
	for i := range nums {
		if nums[i] != i+1 {
			return false
		}
	}
	return true
}

// The whole path: counter under the launcher → agent dump (left frozen) → pod deletion (SIGTERM:
// the launcher kills the frozen app and exits 143) → the writable layer is gone → the agent restores
// + launcher in new namespaces → the counter continues where it stopped, and the file listed in
// checkpoint-files is back.
func TestDumpRestoreCounterContinues(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	work := t.TempDir()
	out := filepath.Join(work, "counter.txt") // open by the app, listed in checkpoint-files
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 10)

	st := r.checkpoint("uid-1", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app"), Files: []string{out}})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	require.Len(t, st.Containers, 1)
	id := st.Containers[0].CheckpointID
	assert.Greater(t, st.BytesWritten, int64(0))

	// Frozen: nothing is written after the dump.
	dumped := readCounts(t, out)
	require.True(t, isSequence(dumped), "counter before dump: %v", dumped)
	root, err := appRoot(r.finder["app"])
	require.NoError(t, err)
	assert.True(t, launcher.Stopped(root), "the app must stay stopped after its dump")
	creds := credentials(t, root)
	assert.Equal(t, "0000000000000000", creds["CapBnd"], "the container has no capability: %v", creds)
	assert.Equal(t, "1", creds["NoNewPrivs"])

	ckpt, err := os.Open(filepath.Join(r.dir("app"), id))
	require.NoError(t, err)
	defer ckpt.Close()
	m, err := checkpoint.CheckAt(ckpt, id, testKey)
	require.NoError(t, err, "the manifest is signed with the agent's key")
	require.NoError(t, checkpoint.VerifyImagesAt(ckpt, m))
	_, err = checkpoint.CheckAt(ckpt, id, checkpoint.Key("another cluster's key, 32 bytes and more"))
	require.ErrorIs(t, err, checkpoint.ErrNotAuthentic)
	assert.Equal(t, "job/default/counter/0", m.Identity, "bound to the pod's identity")
	assert.Equal(t, "app", m.Container)
	assert.Contains(t, strings.Join(m.Process.Argv, " "), counterBin)
	assert.Len(t, m.Stdio, 3)
	assert.GreaterOrEqual(t, m.CriuVersion, 0)

	assert.Equal(t, 143, c.stop(), "a checkpointed app's container exits 143 on SIGTERM")
	assert.Equal(t, dumped, readCounts(t, out), "the frozen app must not run on before it is killed")

	// A new container has a fresh writable layer: the file is gone until the launcher puts it back.
	require.NoError(t, os.Remove(out))

	c2 := r.restoreContainer("app", id, counterBin, out)
	got := waitCount(t, c2, out, len(dumped)+5)
	assert.Equal(t, dumped, got[:len(dumped)], "checkpoint-files content restored")
	assert.True(t, isSequence(got), "the restored counter continues from %d, got %v", len(dumped), got)
	c2.waitOutput("restored; supervising the restored tree")
	restored, err := appRoot(c2.launcherPID())
	require.NoError(t, err)
	assert.Equal(t, creds, credentials(t, restored), "the restored app has the original's credentials, capabilities, no_new_privs and seccomp")
	assert.Equal(t, cgroups(t, c2.launcherPID()), cgroups(t, restored), "the restored app is in its new container's cgroups, not the agent's")
	assert.Equal(t, 1.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("restored")))
	// The restored tree is supervised like a fresh one: SIGTERM reaches the app and ends it.
	code := c2.stop()
	assert.Equal(t, 128+15, code, "the counter dies of SIGTERM: 128+15")

	// The restored pod died before it was checkpointed again (its node was lost): the same
	// checkpoint restores again. CRIU wrote its log and statistics to the agent's work directory,
	// not into the images.
	_, err = os.Stat(filepath.Join(r.dir("app"), id, checkpoint.ImagesDir, "stats-restore"))
	require.True(t, os.IsNotExist(err), "the images stay as they were written: %v", err)
	require.NoError(t, os.Remove(out))
	c3 := r.restoreContainer("app", id, counterBin, out)
	again := waitCount(t, c3, out, len(dumped)+2)
	assert.True(t, isSequence(again), "the second restore continues from %d too, got %v", len(dumped), again)
	c3.waitOutput("restored; supervising the restored tree")
	assert.Equal(t, 2.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("restored")))
	assert.Equal(t, 128+15, c3.stop())
}

// A corrupt image is found by the agent while CRIU restores (the check before it covers sizes,
// not the images' contents): the restored tree, still stopped, is killed and the launcher
// cold-starts the original command.
func TestCorruptCheckpointColdStarts(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	work := t.TempDir()
	out := filepath.Join(work, "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 5)
	st := r.checkpoint("uid-2", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	assert.Equal(t, 143, c.stop())

	// Flip one byte in the middle of the largest pack file of the checkpoint's chunk store.
	corruptPack(t, r.dir("app"))
	require.NoError(t, os.Remove(out))

	c2 := r.restoreContainer("app", id, counterBin, out)
	got := waitCount(t, c2, out, 3)
	assert.Equal(t, []int{1, 2, 3}, got[:3], "cold start counts from 1")
	c2.waitOutput("COLD START")
	assert.Contains(t, c2.out.String(), "corrupt checkpoint")
	assert.Regexp(t, `image [a-z0-9-]+\.img at offset [0-9]+: chunk \S+: `, c2.out.String())

	// The agent counted the cold start (and recorded an Event).
	assert.Equal(t, 1.0, counterValue(t, r.agent.cfg.Metrics.RestoreResults.WithLabelValues("cold-start")))
}

// corruptPack flips one byte in the middle of the largest pack file of a container's chunk store.
func corruptPack(t *testing.T, containerDir string) {
	t.Helper()
	packs, err := filepath.Glob(filepath.Join(containerDir, ".chunks", "*.pack"))
	require.NoError(t, err)
	require.NotEmpty(t, packs)
	var largest string
	var size int64
	for _, p := range packs {
		if fi, err := os.Stat(p); err == nil && fi.Size() > size {
			largest, size = p, fi.Size()
		}
	}
	f, err := os.OpenFile(largest, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	b := make([]byte, 1)
	_, err = f.ReadAt(b, size/2)
	require.NoError(t, err)
	b[0] ^= 0xff
	_, err = f.WriteAt(b, size/2)
	require.NoError(t, err)
}

// Two requests for one pod at once produce one dump, and both callers see the same operation.
func TestConcurrentRequestsOneDump(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 3)

	req := agentapi.CheckpointRequest{Pod: agentapi.PodRef{Namespace: "default", Name: "counter", UID: "uid-3"},
		Containers: []agentapi.ContainerSpec{{Name: "app", Dir: r.dir("app")}}}
	var wg sync.WaitGroup
	starts := make([]agentapi.CheckpointStatus, 2)
	for i := range starts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := r.agent.Start(req)
			assert.NoError(t, err)
			starts[i] = st
		}()
	}
	wg.Wait()
	assert.Equal(t, starts[0].StartedAt, starts[1].StartedAt, "one operation")
	st, err := r.agent.Wait(context.Background(), "uid-3")
	require.NoError(t, err)
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	// A third request after completion joins the finished operation.
	again, err := r.agent.Start(req)
	require.NoError(t, err)
	assert.Equal(t, st.Containers[0].CheckpointID, again.Containers[0].CheckpointID)

	list, err := checkpoint.List(r.dir("app"))
	require.NoError(t, err)
	assert.Len(t, list, 1, "exactly one checkpoint written")
	assert.Equal(t, 143, c.stop())
}

// A dumped app whose pod is not deleted is thawed after --freeze-timeout and runs on.
func TestFrozenAppThawedWhenPodStays(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: 2 * time.Second})
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 3)
	st := r.checkpoint("uid-4", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	dumped := readCounts(t, out)
	root, err := appRoot(r.finder["app"])
	require.NoError(t, err)
	require.True(t, launcher.Stopped(root), "stopped right after the dump")

	got := waitCount(t, c, out, len(dumped)+5)
	assert.True(t, isSequence(got), "the thawed app runs on: %v", got)
	_, known := r.agent.Status("uid-4")
	assert.False(t, known, "a thawed operation is forgotten so the next request dumps again")
	// Not frozen any more: SIGTERM is forwarded, the counter dies of it.
	assert.Equal(t, 128+15, c.stop())
}

// DELETE thaws at once.
func TestDeleteThaws(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 3)
	st := r.checkpoint("uid-5", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	dumped := readCounts(t, out)
	require.True(t, r.agent.Delete("uid-5"))
	waitCount(t, c, out, len(dumped)+3)
	assert.Equal(t, 128+15, c.stop())
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	var m dto.Metric
	require.NoError(t, c.Write(&m))
	return m.GetCounter().GetValue()
}

// Old checkpoints are pruned after the new one is reported: the newest and KeepOlder more are kept, leftovers of interrupted dumps
// removed, a younger directory without marker (a dump that may be in progress) kept.
func TestOldCheckpointsPrunedAfterSuccess(t *testing.T) {
	r := newRig(t, Config{KeepOlder: 1, DumpTimeout: time.Minute})
	out := filepath.Join(t.TempDir(), "counter.txt")
	c := startContainer(t, r.env("app"), "--", counterBin, out)
	r.finder["app"] = c.launcherPID()
	waitCount(t, c, out, 2)
	spec := agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")}
	// Planted before any dump: a pruning in the background must not race their creation.
	stale, err := checkpoint.Begin(r.dir("app"), checkpoint.NewID(time.Now().Add(-time.Hour)))
	require.NoError(t, err)
	inProgress, err := checkpoint.Begin(r.dir("app"), checkpoint.NewID(time.Now()))
	require.NoError(t, err)
	first := r.checkpoint("uid-p1", spec)
	require.Equal(t, agentapi.PhaseSucceeded, first.Phase, first.Message)
	require.True(t, r.agent.Delete("uid-p1")) // thaw: the pod stayed
	second := r.checkpoint("uid-p2", spec)
	require.Equal(t, agentapi.PhaseSucceeded, second.Phase, second.Message)
	require.True(t, r.agent.Delete("uid-p2"))
	third := r.checkpoint("uid-p3", spec)
	require.Equal(t, agentapi.PhaseSucceeded, third.Phase, third.Message)

	require.Eventually(t, func() bool {
		l, err := checkpoint.List(r.dir("app"))
		return err == nil && len(l) == 2 && l[0].ID == third.Containers[0].CheckpointID && l[1].ID == second.Containers[0].CheckpointID
	}, 10*time.Second, 20*time.Millisecond, "the newest checkpoint and one older are kept")
	assert.NoDirExists(t, filepath.Join(r.dir("app"), first.Containers[0].CheckpointID))
	require.Eventually(t, func() bool { _, err := os.Stat(stale.Path()); return os.IsNotExist(err) }, 10*time.Second, 20*time.Millisecond)
	assert.DirExists(t, inProgress.Path())
	assert.Equal(t, 143, c.stop())
}

// The containers of a pod restore together or not at all: two containers restore from one
// checkpoint operation, and when one's image is corrupt both start cold.
func TestPodContainersRestoreTogether(t *testing.T) {
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	work := t.TempDir()
	names := []string{"app", "side"}
	outs := map[string]string{}
	for _, n := range names {
		outs[n] = filepath.Join(work, n+".txt")
		c := startContainer(t, r.env(n), "--", counterBin, outs[n])
		r.finder[n] = c.launcherPID()
		waitCount(t, c, outs[n], 3)
		defer c.stop()
	}
	st := r.checkpoint("uid-pod", agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")}, agentapi.ContainerSpec{Name: "side", Dir: r.dir("side")})
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	require.Len(t, st.Containers, 2)
	id := st.Containers[0].CheckpointID
	assert.Equal(t, id, st.Containers[1].CheckpointID, "one checkpoint ID for the pod: the pod restores one")
	dumped := map[string][]int{}
	for _, n := range names {
		dumped[n] = readCounts(t, outs[n])
	}

	restoreBoth := func() map[string]*container {
		return r.restorePod(id, map[string][]string{"app": {counterBin, outs["app"]}, "side": {counterBin, outs["side"]}})
	}
	cs := restoreBoth()
	for _, n := range names {
		got := waitCount(t, cs[n], outs[n], len(dumped[n])+2)
		assert.True(t, isSequence(got), "%s continues from %d: %v", n, len(dumped[n]), got)
		cs[n].waitOutput("restored; supervising the restored tree")
		cs[n].stop()
	}

	corruptPack(t, r.dir("side"))
	for _, n := range names {
		require.NoError(t, os.Remove(outs[n]))
	}
	cs = restoreBoth()
	for _, n := range names {
		got := waitCount(t, cs[n], outs[n], 2)
		assert.Equal(t, []int{1, 2}, got[:2], "%s starts cold", n)
		cs[n].waitOutput("COLD START")
		cs[n].stop()
	}
	assert.Contains(t, cs["app"].out.String(), "container side cannot restore", "the healthy container says why it did not restore")
}
