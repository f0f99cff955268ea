package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/internal/serving"
	"github.com/stasis-k8s/stasis/wiring"
)

// fakeRuntimePods is the container runtime's answer to "which pods and containers run here" (CRI
// ListPodSandbox/ListContainers/ContainerStatus): the one part of the channel replaced in this
// tier, which runs no containerd. Callers, sockets, cgroups and PID namespaces are real.
type fakeRuntimePods struct {
	mu   sync.Mutex
	pods map[string]agentapi.PodRef
	ctrs map[string]fakeContainer
}

type fakeContainer struct {
	podUID, name string
	pid          func() int // the container's init PID (its PID namespace is the container's)
}

func newFakeRuntimePods() *fakeRuntimePods {
	return &fakeRuntimePods{pods: map[string]agentapi.PodRef{}, ctrs: map[string]fakeContainer{}}
}

func (f *fakeRuntimePods) add(pod agentapi.PodRef, ctrID, name string, pid func() int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pods[pod.UID] = pod
	f.ctrs[ctrID] = fakeContainer{podUID: pod.UID, name: name, pid: pid}
}

func (f *fakeRuntimePods) PodByUID(_ context.Context, uid string) (agentapi.PodRef, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.pods[uid]
	if !ok {
		return agentapi.PodRef{}, errNotOnNode{"pod " + uid}
	}
	return p, nil
}

func (f *fakeRuntimePods) Container(_ context.Context, podUID, id string) (RuntimeContainer, error) {
	f.mu.Lock()
	c, ok := f.ctrs[id]
	f.mu.Unlock()
	if !ok || c.podUID != podUID {
		return RuntimeContainer{}, errNotOnNode{"container " + id + " of pod " + podUID}
	}
	return RuntimeContainer{Name: c.name, PID: c.pid(), ImageRef: "sha256:image-of-" + c.name}, nil
}

// recordedEntrypoints answers every lookup and records what was asked; lookups for the pod UID
// in block wait until unblock is closed (a slow runtime).
type recordedEntrypoints struct {
	mu      sync.Mutex
	asked   []string
	block   string
	unblock chan struct{}
}

func (r *recordedEntrypoints) Entrypoint(ctx context.Context, podUID, container, image string) (agentapi.Entrypoint, error) {
	r.mu.Lock()
	r.asked = append(r.asked, podUID+"/"+container+"/"+image)
	block := r.block != "" && r.block == podUID
	r.mu.Unlock()
	if block {
		select {
		case <-r.unblock:
		case <-ctx.Done():
			return agentapi.Entrypoint{}, ctx.Err()
		}
	}
	return agentapi.Entrypoint{Entrypoint: []string{"/app-of-" + container}}, nil
}

func (r *recordedEntrypoints) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.asked)
}

// recordedEvents stands in for the API server (not in this tier): the Events the agent records.
type recordedEvents struct {
	mu  sync.Mutex
	got []string
}

func (r *recordedEvents) PodEvent(_ context.Context, pod agentapi.PodRef, _ bool, reason, _ string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, pod.Namespace+"/"+pod.Name+" "+reason)
}

func (r *recordedEvents) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.got...)
}

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n/2)
	_, err := crand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}

func randomUID(t testing.TB) string {
	h := randomHex(t, 32)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// podCgroup creates a container cgroup laid out as the kubelet's cgroupfs driver does,
// <root>/kubepods/besteffort/pod<uid>/<container id>, in the v1 pids hierarchy (or the v2 tree on
// a unified host), under a root of its own that no kubelet manages. It is removed at cleanup.
func podCgroup(t testing.TB, podUID, ctrID string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("creating cgroups needs root")
	}
	base := "/sys/fs/cgroup/pids"
	if _, err := os.Stat(filepath.Join(base, "cgroup.procs")); err != nil {
		base = "/sys/fs/cgroup"
		if _, err := os.Stat(filepath.Join(base, "cgroup.controllers")); err != nil {
			t.Skip("no cgroup v1 pids hierarchy and no cgroup v2 tree at /sys/fs/cgroup")
		}
	}
	root := filepath.Join(base, "stasis-test-"+randomHex(t, 8))
	dirs := []string{root, root + "/kubepods", root + "/kubepods/besteffort", root + "/kubepods/besteffort/pod" + podUID,
		root + "/kubepods/besteffort/pod" + podUID + "/" + ctrID}
	for _, d := range dirs {
		require.NoError(t, os.Mkdir(d, 0o755))
	}
	t.Cleanup(func() {
		// The callers have exited (or their container was killed by an earlier cleanup); their
		// cgroup empties once they are reaped.
		deadline := time.Now().Add(10 * time.Second)
		for i := len(dirs) - 1; i >= 0; i-- {
			for {
				err := syscall.Rmdir(dirs[i])
				if err == nil || time.Now().After(deadline) {
					assert.NoError(t, err, "removing test cgroup %s", dirs[i])
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	})
	return dirs[len(dirs)-1]
}

// podsFinder is the agent's ProcessFinder over the runtime stand-in.
type podsFinder struct{ pods *fakeRuntimePods }

func (f podsFinder) Find(_ context.Context, pod agentapi.PodRef, name string) (Target, error) {
	f.pods.mu.Lock()
	defer f.pods.mu.Unlock()
	for _, c := range f.pods.ctrs {
		if c.podUID == pod.UID && c.name == name {
			return Target{PID: c.pid()}, nil
		}
	}
	return Target{}, fmt.Errorf("no container %q in pod %s", name, pod.UID)
}

// localRig is the agent's local socket served by the real handler on a real unix socket.
type localRig struct {
	agent  *Agent
	pods   *fakeRuntimePods
	eps    *recordedEntrypoints
	events *recordedEvents
	socket string
}

func newLocalRig(t *testing.T, cfg LocalConfig) *localRig {
	require.NoError(t, buildErr)
	r := &localRig{pods: newFakeRuntimePods(), eps: &recordedEntrypoints{}, events: &recordedEvents{}}
	// The agent finds containers where the runtime stand-in has them; no CRIU runs in these tests
	// (an empty folder stands for the bundle): a restore that gets past the checks finds no
	// checkpoint to restore and answers a cold start.
	a, err := New(context.Background(), Config{Finder: podsFinder{r.pods}, Criu: criurun.Bundle{Dir: t.TempDir()}, ManifestKey: testKey,
		Events: r.events, Log: zerolog.New(zerolog.NewTestWriter(t))})
	require.NoError(t, err)
	r.agent = a
	cfg.Pods, cfg.Entrypoints = r.pods, r.eps
	l := NewLocal(a, cfg)
	dir := filepath.Join(t.TempDir(), "run-stasis")
	ln, err := ListenLocal(dir, wiring.AgentSocketName)
	require.NoError(t, err)
	srv := l.Server()
	go func() { _ = srv.Serve(l.Listener(ln)) }()
	t.Cleanup(func() { _ = srv.Close() })
	r.socket = filepath.Join(dir, wiring.AgentSocketName)
	return r
}

// callerResult is testdata/localcaller's output.
type callerResult struct {
	Code       int    `json:"code"`
	Body       string `json:"body"`
	Err        string `json:"err"`
	ReplaceErr string `json:"replaceErr"`
	FloodErr   string `json:"floodErr"`
}

// call runs testdata/localcaller (through prefix, e.g. unshare, when given) and returns its result.
func call(t *testing.T, prefix []string, args ...string) callerResult {
	t.Helper()
	argv := append(append(append([]string{}, prefix...), callerBin), args...)
	out, err := exec.Command(argv[0], argv[1:]...).Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		t.Fatalf("localcaller %v: %v\n%s", args, err, ee.Stderr)
	}
	require.NoError(t, err)
	var res callerResult
	require.NoError(t, json.Unmarshal(out, &res), "localcaller output %q", out)
	return res
}

func restoreBody(pod agentapi.PodRef, container string) string {
	b, _ := json.Marshal(agentapi.RestoreRequest{Pod: pod, Container: container, CheckpointID: "20261130T000000.000Z-000000"})
	return string(b)
}

func (r *localRig) refusals(t *testing.T, reason string) float64 {
	return counterValue(t, r.agent.cfg.Metrics.LocalRefusals.WithLabelValues(reason))
}

// Two pods on one node: each caller is answered about its own pod and container only, whatever
// it claims; a caller outside any pod, in an unknown pod, or that moved itself into another
// pod's cgroup (it cannot move into that pod's PID namespace) is refused.
func TestLocalCallerIsItsOwnPodOnly(t *testing.T) {
	r := newLocalRig(t, LocalConfig{})
	podA := agentapi.PodRef{Namespace: "team-a", Name: "app-a", UID: randomUID(t)}
	podB := agentapi.PodRef{Namespace: "team-b", Name: "app-b", UID: randomUID(t)}
	ctrA, ctrB := randomHex(t, 64), randomHex(t, 64)
	cgA, cgB := podCgroup(t, podA.UID, ctrA), podCgroup(t, podB.UID, ctrB)
	// Container A's init shares the callers' PID namespace (this test's); container B's init is
	// PID 1 of a PID namespace of its own, like any container.
	self := os.Getpid()
	r.pods.add(podA, ctrA, "app", func() int { return self })
	initB := exec.Command("unshare", "--pid", "--fork", "sleep", "300")
	require.NoError(t, initB.Start())
	t.Cleanup(func() { _ = initB.Process.Kill(); _ = initB.Wait() })
	require.Eventually(t, func() bool { return len(criurun.Children(initB.Process.Pid)) == 1 }, 5*time.Second, 10*time.Millisecond)
	pidB := criurun.Children(initB.Process.Pid)[0]
	r.pods.add(podB, ctrB, "app", func() int { return pidB })
	sock := "-socket=" + r.socket
	post := func(cg string, body string) callerResult {
		return call(t, nil, sock, "-cgroup="+cg, "-method=POST", "-path="+agentapi.LocalPathRestore, "-body="+body)
	}

	// A about itself: answered, the Event lands on A.
	res := call(t, nil, sock, "-cgroup="+cgA, "-path="+agentapi.LocalPathEntrypoint+"?podUID="+podA.UID+"&container=app&image=other:image")
	require.Equal(t, http.StatusOK, res.Code, res.Body)
	assert.Contains(t, res.Body, "/app-of-app")
	assert.Equal(t, []string{podA.UID + "/app/sha256:image-of-app"}, r.eps.asked, "the lookup is about A's container and its image; image= is ignored")
	// A restore asked by a process of A that is not its container's PID 1: refused by the agent.
	res = post(cgA, restoreBody(podA, "app"))
	require.Equal(t, http.StatusForbidden, res.Code, res.Body)
	assert.Contains(t, res.Body, "PID 1")
	assert.Equal(t, 1.0, r.refusals(t, "not-pid-1"))

	// A about B: refused, nothing recorded on B.
	res = call(t, nil, sock, "-cgroup="+cgA, "-path="+agentapi.LocalPathEntrypoint+"?podUID="+podB.UID+"&container=app")
	assert.Equal(t, http.StatusForbidden, res.Code, res.Body)
	assert.Contains(t, res.Body, "its own pod only")
	res = post(cgA, restoreBody(podB, "app"))
	assert.Equal(t, http.StatusForbidden, res.Code, res.Body)
	res = post(cgA, restoreBody(agentapi.PodRef{Namespace: "team-b", Name: "app-b"}, "app"))
	assert.Equal(t, http.StatusForbidden, res.Code, "B's namespace/name without a UID: %s", res.Body)
	res = post(cgA, restoreBody(podA, "sidecar"))
	assert.Equal(t, http.StatusForbidden, res.Code, "another container of A: %s", res.Body)
	assert.Equal(t, 3.0, r.refusals(t, "other-pod"))
	assert.Equal(t, 1.0, r.refusals(t, "other-container"))

	// Outside any pod's cgroup (this test's own cgroups): refused.
	res = call(t, nil, sock, "-method=POST", "-path="+agentapi.LocalPathRestore, "-body="+restoreBody(podA, "app"))
	assert.Equal(t, http.StatusForbidden, res.Code, res.Body)
	assert.Contains(t, res.Body, "not in a Kubernetes pod's cgroup")
	res = call(t, nil, sock)
	assert.Equal(t, http.StatusForbidden, res.Code, res.Body)
	assert.Equal(t, 2.0, r.refusals(t, "not-a-pod"))

	// In B's cgroup (moved there, as a process with the rights to could on cgroup v1) but in A's
	// PID namespace: refused.
	res = post(cgB, restoreBody(podB, "app"))
	assert.Equal(t, http.StatusForbidden, res.Code, res.Body)
	assert.Contains(t, res.Body, "not in its PID namespace")
	// In the cgroup of a pod the runtime does not run: refused.
	res = post(podCgroup(t, randomUID(t), randomHex(t, 64)), restoreBody(podA, "app"))
	assert.Equal(t, http.StatusForbidden, res.Code, res.Body)
	assert.Equal(t, 1.0, r.refusals(t, "wrong-container"))
	assert.Equal(t, 1.0, r.refusals(t, "unknown-pod"))

	assert.Empty(t, r.events.list(), "nothing was recorded on any pod")
}

// A launcher in the pod's real PID namespace (unshare --pid, as a container) is accepted: the
// PID-namespace check compares the caller with its container's init, not with the agent.
func TestLocalCallerInContainerPIDNamespace(t *testing.T) {
	r := newLocalRig(t, LocalConfig{})
	pod := agentapi.PodRef{Namespace: "ns", Name: "p", UID: randomUID(t)}
	ctr := randomHex(t, 64)
	cg := podCgroup(t, pod.UID, ctr)
	// The container: sh in the pod's cgroup starts a new PID namespace whose PID 1 is the caller.
	cmd := exec.Command("sh", "-c", `echo $$ > "$0/cgroup.procs" && exec unshare --pid --fork --mount-proc "$@"`, cg,
		callerBin, "-socket="+r.socket, "-method=POST", "-path="+agentapi.LocalPathRestore,
		"-body="+restoreBody(agentapi.PodRef{UID: pod.UID}, "app"))
	var initPID atomic.Int64
	r.pods.add(pod, ctr, "app", func() int { return int(initPID.Load()) })
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	// unshare forks the caller: its child is the container's init.
	require.Eventually(t, func() bool {
		ch := criurun.Children(cmd.Process.Pid)
		if len(ch) == 1 {
			initPID.Store(int64(ch[0]))
		}
		return initPID.Load() != 0
	}, 5*time.Second, time.Millisecond)
	var res callerResult
	require.NoError(t, json.NewDecoder(stdout).Decode(&res))
	require.NoError(t, cmd.Wait())
	assert.Equal(t, http.StatusOK, res.Code, res.Body)
	assert.Contains(t, res.Body, `"restored":false`, "no checkpoint to restore here: a cold start")
	assert.Equal(t, []string{"ns/p RestoreFailed"}, r.events.list(), "namespace and name come from the runtime")
}

// One pod cannot starve the others: its connections over the cap are closed at once, its requests
// over the in-flight cap get 429 and its oversized bodies are refused, while another pod is served.
func TestLocalPerPodBounds(t *testing.T) {
	r := newLocalRig(t, LocalConfig{MaxConnsPerPod: 2, MaxInFlightPerPod: 1})
	self := os.Getpid()
	podA := agentapi.PodRef{Namespace: "a", Name: "a", UID: randomUID(t)}
	podB := agentapi.PodRef{Namespace: "b", Name: "b", UID: randomUID(t)}
	ctrA, ctrB := randomHex(t, 64), randomHex(t, 64)
	cgA, cgB := podCgroup(t, podA.UID, ctrA), podCgroup(t, podB.UID, ctrB)
	r.pods.add(podA, ctrA, "app", func() int { return self })
	r.pods.add(podB, ctrB, "app", func() int { return self })

	// A holds its two connections and tries a third (kept running until stdin closes).
	hog := exec.Command(callerBin, "-socket="+r.socket, "-cgroup="+cgA, "-hold=2", "-wait-stdin")
	stdin, err := hog.StdinPipe()
	require.NoError(t, err)
	stdout, err := hog.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, hog.Start())
	var res callerResult
	require.NoError(t, json.NewDecoder(stdout).Decode(&res))
	assert.NotEmpty(t, res.Err, "the third connection of pod A must be closed, got %d %s", res.Code, res.Body)
	assert.Equal(t, 1.0, r.refusals(t, "too-many-connections"))

	// Meanwhile B is served.
	res = call(t, nil, "-socket="+r.socket, "-cgroup="+cgB)
	assert.Equal(t, http.StatusOK, res.Code, res.Body)
	require.NoError(t, stdin.Close())
	require.NoError(t, hog.Wait())

	// A's requests in progress are capped: with A's one slot held by a slow lookup, A's next
	// request gets 429 while B is still served.
	r.eps.mu.Lock()
	r.eps.block, r.eps.unblock = podA.UID, make(chan struct{})
	r.eps.mu.Unlock()
	r.agent.cfg.Metrics.LocalRefusals.Reset()
	slow := exec.Command(callerBin, "-socket="+r.socket, "-cgroup="+cgA)
	slowOut, err := slow.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, slow.Start())
	require.Eventually(t, func() bool { return r.eps.count() == 2 }, 10*time.Second, 10*time.Millisecond, "A's slow lookup started")
	res = call(t, nil, "-socket="+r.socket, "-cgroup="+cgA)
	assert.Equal(t, http.StatusTooManyRequests, res.Code, res.Body)
	assert.Equal(t, 1.0, r.refusals(t, "busy"))
	res = call(t, nil, "-socket="+r.socket, "-cgroup="+cgB)
	assert.Equal(t, http.StatusOK, res.Code, res.Body)
	close(r.eps.unblock)
	require.NoError(t, json.NewDecoder(slowOut).Decode(&res))
	require.NoError(t, slow.Wait())
	assert.Equal(t, http.StatusOK, res.Code, "A's slow lookup completes: %s", res.Body)

	// A body over 64 KiB is refused.
	res = call(t, nil, "-socket="+r.socket, "-cgroup="+cgB, "-method=POST", "-path="+agentapi.LocalPathRestore,
		"-body="+restoreBody(podB, "app"), fmt.Sprintf("-pad=%d", 100<<10))
	assert.Equal(t, http.StatusBadRequest, res.Code, res.Body)
	assert.Contains(t, res.Body, "too large")
	assert.Empty(t, r.events.list())
}

// Wired pods mount the socket directory read-only: connecting works through the read-only bind
// mount, while removing the socket or writing beside it fails (the attack on other pods' channel).
func TestLocalSocketThroughReadOnlyMount(t *testing.T) {
	r := newLocalRig(t, LocalConfig{})
	pod := agentapi.PodRef{Namespace: "ns", Name: "p", UID: randomUID(t)}
	ctr := randomHex(t, 64)
	cg := podCgroup(t, pod.UID, ctr)
	self := os.Getpid()
	r.pods.add(pod, ctr, "app", func() int { return self })
	if out, err := exec.Command("unshare", "--mount", "--propagation", "private", "true").CombinedOutput(); err != nil {
		t.Skipf("cannot create a private mount namespace here (unshare -m): %v: %s", err, out)
	}
	mnt := t.TempDir()
	script := `set -e; mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; shift 2; exec "$@"`
	res := call(t, []string{"unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", filepath.Dir(r.socket), mnt},
		"-socket="+filepath.Join(mnt, wiring.AgentSocketName), "-cgroup="+cg, "-replace",
		"-method=POST", "-path="+agentapi.LocalPathRestore, "-body="+restoreBody(pod, "app"))
	assert.Contains(t, res.ReplaceErr, "read-only file system", "removing the socket through the read-only mount")
	assert.Contains(t, res.FloodErr, "read-only file system", "writing into the socket directory")
	assert.Equal(t, http.StatusForbidden, res.Code, "connecting through the read-only mount works (the agent answered): %s %s", res.Body, res.Err)
	assert.Contains(t, res.Body, "PID 1", "answered by the agent's own check")
	_, err := os.Stat(r.socket)
	assert.NoError(t, err, "the socket is still there")
}

// The socket directory is the agent's: root-owned 0755 even when it existed with other modes,
// the socket connectable by anyone (launchers run as the app's user); a non-socket in the
// socket's place is not removed.
func TestListenLocalDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to root needs root")
	}
	dir := filepath.Join(t.TempDir(), "run")
	require.NoError(t, os.Mkdir(dir, 0o777))
	require.NoError(t, os.Chown(dir, 1000, 1000))
	ln, err := ListenLocal(dir, wiring.AgentSocketName)
	require.NoError(t, err)
	defer ln.Close()
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(dir, &st))
	assert.Equal(t, uint32(0o755), st.Mode&0o7777)
	assert.Equal(t, uint32(0), st.Uid)
	require.NoError(t, syscall.Stat(filepath.Join(dir, wiring.AgentSocketName), &st))
	assert.Equal(t, uint32(0o666), st.Mode&0o777)

	ready, err := socketCheck(filepath.Join(dir, wiring.AgentSocketName))
	require.NoError(t, err)
	require.NoError(t, ready(context.Background()))
	// Replaced behind the agent's back: not ready.
	require.NoError(t, os.Remove(filepath.Join(dir, wiring.AgentSocketName)))
	require.NoError(t, os.WriteFile(filepath.Join(dir, wiring.AgentSocketName), nil, 0o644))
	assert.ErrorContains(t, ready(context.Background()), wiring.AgentSocketName)
	_, err = ListenLocal(dir, wiring.AgentSocketName)
	assert.ErrorContains(t, err, "not a socket")

	link := filepath.Join(t.TempDir(), "link")
	require.NoError(t, os.Symlink(t.TempDir(), link))
	_, err = ListenLocal(link, wiring.AgentSocketName)
	assert.ErrorContains(t, err, "not a directory")
}

func TestParsePodCgroup(t *testing.T) {
	const (
		uid  = "0b6e3e3a-4c2d-4f59-9f3e-7a1b2c3d4e5f"
		uidU = "0b6e3e3a_4c2d_4f59_9f3e_7a1b2c3d4e5f"
		ctr  = "4f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
		ctr2 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	)
	v1 := func(path string) string {
		return fmt.Sprintf("9:name=systemd:/\n8:pids:%s\n4:memory:%s\n1:cpu,cpuacct:%s\n0::/\n", path, path, path)
	}
	cases := []struct {
		name, content, wantErr string
	}{
		{"v1 cgroupfs besteffort", v1("/kubepods/besteffort/pod" + uid + "/" + ctr), ""},
		{"v1 cgroupfs guaranteed", v1("/kubepods/pod" + uid + "/" + ctr), ""},
		{"v1 cgroupfs under a cgroup root", v1("/node-a/kubepods/burstable/pod" + uid + "/" + ctr), ""},
		{"v1 cgroupfs, CRI-O", v1("/kubepods/burstable/pod" + uid + "/crio-" + ctr), ""},
		{"v1 systemd", v1("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidU + ".slice/cri-containerd-" + ctr + ".scope"), ""},
		{"v2 systemd", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + ctr + ".scope\n", ""},
		{"v2 systemd guaranteed, CRI-O", "0::/kubepods.slice/kubepods-pod" + uidU + ".slice/crio-" + ctr + ".scope\n", ""},
		{"v2 cgroupfs", "0::/kubepods/besteffort/pod" + uid + "/" + ctr + "\n", ""},
		{"v2 seen from another cgroup namespace", "0::/../../kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + ctr + ".scope\n", ""},
		{"kind node in docker", "0::/docker/" + ctr2 + "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubepods-besteffort-pod" + uidU + ".slice/cri-containerd-" + ctr + ".scope\n", ""},
		{"memory in another hierarchy only (ignored)", "8:pids:/kubepods/besteffort/pod" + uid + "/" + ctr + "\n4:memory:/process_api/abc\n0::/\n", ""},

		{"host process", v1("/system.slice/containerd.service"), "not in a Kubernetes pod's cgroup"},
		{"root", v1("/"), "not in a Kubernetes pod's cgroup"},
		{"pod level, no container", v1("/kubepods/besteffort/pod" + uid), "not in a container's"},
		{"below the container", v1("/kubepods/besteffort/pod" + uid + "/" + ctr + "/sub"), "2 elements after the pod element"},
		{"hierarchies disagree on the pod", "8:pids:/kubepods/pod" + uid + "/" + ctr + "\n4:memory:/kubepods/pod" + strings.Replace(uid, "0b6e", "1b6e", 1) + "/" + ctr + "\n", "disagree"},
		{"hierarchies disagree on the container", "8:pids:/kubepods/pod" + uid + "/" + ctr + "\n4:memory:/kubepods/pod" + uid + "/" + ctr2 + "\n", "disagree"},
		{"two pod elements", v1("/kubepods/pod" + uid + "/pod" + uid + "/" + ctr), "more than one pod element"},
		{"uppercase UID", v1("/kubepods/pod" + strings.ToUpper(uid) + "/" + ctr), "not in a Kubernetes pod's cgroup"},
		{"short container ID", v1("/kubepods/pod" + uid + "/" + ctr[:12]), "not a container ID element"},
		{"systemd UID with dashes", "0::/kubepods.slice/kubepods-pod" + uid + ".slice/cri-containerd-" + ctr + ".scope\n", "not in a Kubernetes pod's cgroup"},
		{"systemd unknown QoS", "0::/kubepods.slice/kubepods-gold-pod" + uidU + ".slice/cri-containerd-" + ctr + ".scope\n", "not in a Kubernetes pod's cgroup"},
		{"pod look-alike", v1("/kubepods/podcast/" + ctr), "not in a Kubernetes pod's cgroup"},
		{"malformed line", "kubepods/pod" + uid, "not <id>:<controllers>:<path>"},
		{"empty", "", "not <id>:<controllers>:<path>"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			gotUID, gotCtr, err := ParsePodCgroup(tc.content)
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
				assert.Empty(t, gotUID)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, uid, gotUID)
			assert.Equal(t, ctr, gotCtr)
		})
	}
}

// /readyz reflects the agent's parts: it answers 503 naming each failing check while the
// container runtime is unreachable, 200 once a runtime answers on the CRI socket.
func TestReadyz(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	crt, key := ca.issue(t, agentapi.ServerName, x509.ExtKeyUsageServerAuth)
	for n, b := range map[string][]byte{"tls.crt": crt, "tls.key": key, "ca.crt": ca.pem} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, n), b, 0o600))
	}
	_, certReady, err := serverTLS(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt"))
	require.NoError(t, err)
	ln, err := ListenLocal(filepath.Join(dir, "run"), wiring.AgentSocketName)
	require.NoError(t, err)
	defer ln.Close()
	sockReady, err := socketCheck(filepath.Join(dir, "run", wiring.AgentSocketName))
	require.NoError(t, err)
	criSock := filepath.Join(dir, "cri.sock")
	runtime, err := DialCRI("unix://" + criSock)
	require.NoError(t, err)
	defer runtime.Close()
	h := serving.Ready(serving.Check{Name: "serving certificate", Check: certReady}, serving.Check{Name: "container runtime", Check: runtime.Ping}, serving.Check{Name: "local socket", Check: sockReady})

	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	assert.Equal(t, http.StatusServiceUnavailable, w.Code)
	assert.Contains(t, w.Body.String(), "container runtime: CRI Version")
	assert.NotContains(t, w.Body.String(), "local socket")
	assert.NotContains(t, w.Body.String(), "serving certificate")

	// A runtime answering CRI Version on the socket (a real gRPC server; only Version is served).
	criLn, err := net.Listen("unix", criSock)
	require.NoError(t, err)
	gs := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(gs, versionOnlyRuntime{})
	go func() { _ = gs.Serve(criLn) }()
	defer gs.Stop()
	require.Eventually(t, func() bool {
		w = httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/readyz", nil))
		return w.Code == http.StatusOK
	}, 10*time.Second, 50*time.Millisecond, "last answer: %d %s", w.Code, w.Body)
}

type versionOnlyRuntime struct {
	runtimeapi.UnimplementedRuntimeServiceServer
}

func (versionOnlyRuntime) Version(context.Context, *runtimeapi.VersionRequest) (*runtimeapi.VersionResponse, error) {
	return &runtimeapi.VersionResponse{RuntimeName: "test"}, nil
}

// An expired serving certificate makes the agent unready (the TLS handshake would fail anyway).
func TestReadyzExpiredCertificate(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: agentapi.ServerName},
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	dir := t.TempDir()
	crt := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	files := map[string][]byte{"tls.crt": crt, "tls.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), "ca.crt": crt}
	for n, b := range files {
		require.NoError(t, os.WriteFile(filepath.Join(dir, n), b, 0o600))
	}
	_, ready, err := serverTLS(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt"))
	require.NoError(t, err)
	assert.ErrorContains(t, ready(context.Background()), "expired at")
}

// fakeSandboxes stands in for CRI's list of wired pod sandboxes.
type fakeSandboxes struct {
	mu  sync.Mutex
	sbs []Sandbox
}

func (f *fakeSandboxes) WiredSandboxes(context.Context) ([]Sandbox, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Sandbox(nil), f.sbs...), nil
}

func (f *fakeSandboxes) set(sbs ...Sandbox) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sbs = sbs
}

// The channel needs no volume: the agent listens on the abstract socket inside each wired pod's
// network namespace. A process in that namespace reaches it (and is then identified like any
// caller); one in another namespace, the node's included, cannot; the listener goes with the pod.
func TestPodSocketsInPodNetworkNamespace(t *testing.T) {
	r := newLocalRig(t, LocalConfig{})
	pod := exec.Command("unshare", "--net", "sleep", "300") // the pod's sandbox: a network namespace of its own
	require.NoError(t, pod.Start())
	t.Cleanup(func() { _ = pod.Process.Kill(); _ = pod.Wait() })
	require.Eventually(t, func() bool {
		a, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pod.Process.Pid))
		b, _ := os.Readlink("/proc/self/ns/net")
		return a != "" && a != b
	}, 5*time.Second, 10*time.Millisecond)
	sbs := &fakeSandboxes{}
	sbs.set(Sandbox{ID: "sb-1", PodUID: randomUID(t), PID: pod.Process.Pid})
	ps := &PodSockets{Local: NewLocal(r.agent, LocalConfig{Pods: r.pods}), Lister: sbs, Interval: 20 * time.Millisecond, Log: zerolog.New(zerolog.NewTestWriter(t))}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go func() { _ = ps.Run(ctx) }()
	require.Eventually(t, func() bool { return ps.Open() == 1 }, 5*time.Second, 10*time.Millisecond)

	inPod := []string{"nsenter", "--net", "-t", strconv.Itoa(pod.Process.Pid), "--"}
	res := call(t, inPod, "-socket="+wiring.AgentSocket)
	assert.Empty(t, res.Err, "reachable from the pod's network namespace")
	assert.Equal(t, http.StatusForbidden, res.Code, "and the caller is identified like any other: %s", res.Body)
	assert.Contains(t, res.Body, "containers of pods only")

	res = call(t, nil, "-socket="+wiring.AgentSocket)
	assert.NotEmpty(t, res.Err, "not reachable from the node's network namespace: %d %s", res.Code, res.Body)

	sbs.set()
	require.Eventually(t, func() bool { return ps.Open() == 0 }, 5*time.Second, 10*time.Millisecond)
	res = call(t, inPod, "-socket="+wiring.AgentSocket)
	assert.NotEmpty(t, res.Err, "gone with the pod")
}
