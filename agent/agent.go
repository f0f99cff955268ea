// Package agent is `stasis agent`, the node agent: it dumps the app trees of checkpoint-enabled
// containers with CRIU when the webhook asks (mTLS API, agentapi), keeps the dumped apps frozen
// until their pod is deleted (or thaws them after a timeout), and serves the launchers of its node
// on a local unix socket (image entrypoints, restore results turned into Events).
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/wiring"
)

// ProcessFinder finds the host PID of a container's PID 1 (the launcher).
type ProcessFinder interface {
	Find(ctx context.Context, pod agentapi.PodRef, container string) (Target, error)
}

// Target is a running container found by a ProcessFinder.
type Target struct {
	PID      int
	Image    string
	ImageRef string
	// PodAnnotations are the pod's annotations as the kubelet gave them to the runtime (the pod
	// sandbox's): where the agent reads what the webhook decided (identity, checkpoint to restore).
	PodAnnotations map[string]string
	// Started is when the container started (zero: unknown, the start of its PID 1 is used): a
	// file of its root changed since is in its writable layer.
	Started time.Time
	// Mounts are the container's volume mounts as the kubelet gave them to the runtime.
	Mounts []Mount
	// Attempt counts the container's in-place restarts in its pod (0: its first start).
	Attempt uint32
}

// Mount is one volume mount of a container.
type Mount struct {
	ContainerPath string
	HostPath      string // the kubelet's directory of the volume, which names its kind
	ReadOnly      bool
}

// EventRecorder records Events on pods (nil: no Events).
type EventRecorder interface {
	PodEvent(ctx context.Context, pod agentapi.PodRef, warning bool, reason, message string)
}

// Config configures an Agent.
type Config struct {
	NodeName string
	// ManifestKey signs the manifests the agent writes; it restores only manifests it signed.
	ManifestKey checkpoint.Key
	// NamespaceKeys supplies each namespace's key-encryption key (namespacekeys: a Secret per
	// namespace); nil derives them from ManifestKey.
	NamespaceKeys checkpoint.KEKSource
	// RestoreDir holds the agent's private working directories: the image streamer's sockets,
	// CRIU's restore logs (default os.TempDir()).
	RestoreDir string
	// Criu is the agent's own CRIU (from its image): the only CRIU the agent ever runs.
	Criu criurun.Bundle
	// CriuVersion is the version the agent's version gate measured (recorded in manifests).
	CriuVersion int
	// MaxConcurrentDumps bounds the dumps running at once; MinConcurrentDumps (default: the
	// same, a fixed limit) is the fewest the scheduler goes down to when the node's checkpoint
	// writes stop gaining from more dumps at once (schedule.go).
	MaxConcurrentDumps, MinConcurrentDumps int
	// FreezeTimeout: an app still frozen this long after its dump (its pod was not deleted) is thawed.
	FreezeTimeout time.Duration
	// Pods tells whether a pod's deletion has started (nil: only FreezeTimeout thaws). With it, an
	// app whose pod is not being deleted ReleaseAfter (default 15s) after the webhook last asked
	// about its checkpoint is thawed.
	Pods         PodStates
	ReleaseAfter time.Duration
	// StateDir keeps, per node, the operations whose apps are frozen (a tmpfs of the host such as
	// /run/stasis/state): a restarted agent adopts them. Empty: none kept.
	StateDir string
	// DumpTimeout bounds one container's dump.
	DumpTimeout time.Duration
	// CheckpointMount is where pods mount their checkpoint volume (wiring.CheckpointMount).
	CheckpointMount string
	// RestoreTimeout bounds one container's restore; then it starts afresh.
	RestoreTimeout time.Duration
	// PlainCheckpoints stores checkpoint chunks unencrypted (--encrypt-checkpoints=false); they
	// stay named by a keyed hash, checked on read and listed in the signed manifest.
	PlainCheckpoints bool
	// LazyRestore: "auto" (default: lazy when `criu check --feature uffd-noncoop` passes at
	// start) or "off" (always a full restore). See lazy.go.
	LazyRestore string
	// KeepOlder is how many complete checkpoints are kept per container besides the newest (the
	// webhook's --keep-checkpoints, which a request's Keep carries, means the same); default 1.
	KeepOlder int
	// CopyLimits bound what checkpoint-files may copy out of a container (default
	// checkpoint.DefaultCopyLimits).
	CopyLimits checkpoint.CopyLimits
	Finder     ProcessFinder
	Events     EventRecorder
	Metrics    *Metrics
	Log        zerolog.Logger
	// Now is the clock (tests: none needed; kept for checkpoint IDs).
	Now func() time.Time
}

func (c *Config) defaults() error {
	if c.Finder == nil {
		return errors.New("agent: no process finder")
	}
	if c.Criu.Dir == "" {
		return errors.New("agent: no CRIU bundle")
	}
	if len(c.ManifestKey) == 0 {
		return errors.New("agent: no manifest key (--manifest-key-file)")
	}
	if c.MaxConcurrentDumps <= 0 {
		c.MaxConcurrentDumps = DefaultMaxConcurrentDumps
	}
	if c.MinConcurrentDumps <= 0 || c.MinConcurrentDumps > c.MaxConcurrentDumps {
		c.MinConcurrentDumps = min(1, c.MaxConcurrentDumps)
	}
	if c.FreezeTimeout <= 0 {
		c.FreezeTimeout = 5 * time.Minute
	}
	if c.ReleaseAfter <= 0 {
		c.ReleaseAfter = 15 * time.Second
	}
	if c.DumpTimeout <= 0 {
		c.DumpTimeout = 15 * time.Minute
	}
	if c.CheckpointMount == "" {
		c.CheckpointMount = wiring.CheckpointMount
	}
	if c.RestoreTimeout <= 0 {
		c.RestoreTimeout = 5 * time.Minute
	}
	if c.KeepOlder <= 0 {
		c.KeepOlder = 1
	}
	if c.CopyLimits == (checkpoint.CopyLimits{}) {
		c.CopyLimits = checkpoint.DefaultCopyLimits
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics(nil)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}

// Agent runs checkpoint operations, one per pod UID.
type Agent struct {
	cfg   Config
	ctx   context.Context
	sched *scheduler // dump slots (schedule.go)

	mu       sync.Mutex
	ops      map[string]*operation
	restores map[string]*podRestore // by pod UID
	// noLazy says why restores are not lazy (nil: they are), decided at start.
	noLazy error
	// lazyRuns: lazy restores by their container's launcher, until it asks how they ended
	// (TakeRestoreOutcome) or is gone.
	lazyRuns map[launcherKey]*lazyRun
}

type operation struct {
	cancel context.CancelFunc
	done   chan struct{}
	bytes  atomic.Int64
	// expected is the estimate of the bytes the dump will have written (progress.go).
	expected atomic.Int64

	mu     sync.Mutex
	status agentapi.CheckpointStatus
	// sched and waiter: the operation's place in the node's queue while Pending.
	sched  *scheduler
	waiter *slotWaiter
	frozen []frozenTree
	timer  *time.Timer // the next look at a frozen operation (holdFrozen)
	// periodic: a checkpoint that leaves the app running (periodic.go); set at creation.
	periodic bool
	asked    time.Time // when the webhook last asked about it
}

// New returns an agent whose operations live as long as ctx.
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, ctx: ctx, sched: newScheduler(schedConfig{Max: cfg.MaxConcurrentDumps, Min: cfg.MinConcurrentDumps, Changed: cfg.Metrics.schedChanged}), ops: map[string]*operation{}, restores: map[string]*podRestore{}}
	if a.noLazy = lazyDecision(ctx, &a.cfg); a.noLazy != nil {
		cfg.Log.Info().Str("why", a.noLazy.Error()).Msg("restores are full, not lazy")
	}
	if err := a.adoptFrozen(); err != nil {
		return nil, fmt.Errorf("frozen apps of a previous agent (%s): %w", a.stateDir(), err)
	}
	return a, nil
}

// ValidateRequest checks a request and names the offending field.
func ValidateRequest(req agentapi.CheckpointRequest) error {
	if req.Pod.UID == "" {
		return errors.New("pod.uid: required")
	}
	if len(req.Containers) == 0 {
		return errors.New("containers: at least one container is required")
	}
	seen := map[string]bool{}
	for i, c := range req.Containers {
		switch {
		case c.Name == "":
			return fmt.Errorf("containers[%d].name: required", i)
		case seen[c.Name]:
			return fmt.Errorf("containers[%d].name: %q listed twice", i, c.Name)
		case !path.IsAbs(c.Dir) || path.Clean(c.Dir) != c.Dir || c.Dir == "/":
			return fmt.Errorf("containers[%d].dir: %q is not a clean absolute directory", i, c.Dir)
		}
		seen[c.Name] = true
		for j, f := range c.Files {
			if !path.IsAbs(f) {
				return fmt.Errorf("containers[%d].files[%d]: %q is not an absolute path", i, j, f)
			}
		}
	}
	return nil
}

// Start starts a checkpoint for the request's pod, or joins the operation that exists for its UID
// (in flight or finished): a retried eviction never causes a second dump.
func (a *Agent) Start(req agentapi.CheckpointRequest) (agentapi.CheckpointStatus, error) {
	if err := ValidateRequest(req); err != nil {
		return agentapi.CheckpointStatus{}, err
	}
	a.mu.Lock()
	prev, ok := a.ops[req.Pod.UID]
	if ok && (!prev.periodic || req.LeaveRunning) {
		a.mu.Unlock()
		prev.promote(dumpUrgency(req))
		// Not a question that holds a frozen app (no touch): an eviction retried after the API
		// server refused it (a PDB) joins the finished operation and is allowed at once, again
		// and again; the app must be released all the same.
		return prev.snapshot(), nil
	}
	// A periodic checkpoint in flight leaves the app running: an eviction or a termination must
	// not join it (the app would run on past its checkpoint), it dumps after it.
	ctx, cancel := context.WithCancel(a.ctx)
	op := &operation{cancel: cancel, done: make(chan struct{}), periodic: req.LeaveRunning}
	op.status = agentapi.CheckpointStatus{Pod: req.Pod, Node: a.cfg.NodeName, Phase: agentapi.PhasePending, StartedAt: a.cfg.Now().UTC(), Message: "waiting for a dump slot"}
	a.ops[req.Pod.UID] = op
	if prev == nil {
		a.queue(op, req) // by urgency, then in the order asked: the order of the evictions
	}
	a.mu.Unlock()
	go func() {
		if prev != nil {
			<-prev.done
			a.queue(op, req)
		}
		a.run(ctx, op, req)
	}()
	return op.snapshot(), nil
}

// Wait blocks until the operation for uid is done (or ctx ends) and returns its status.
func (a *Agent) Wait(ctx context.Context, uid string) (agentapi.CheckpointStatus, error) {
	a.mu.Lock()
	op, ok := a.ops[uid]
	a.mu.Unlock()
	if !ok {
		return agentapi.CheckpointStatus{}, fmt.Errorf("no checkpoint operation for pod %s", uid)
	}
	defer func() { op.touch(a.cfg.Now()) }()
	select {
	case <-op.done:
	case <-ctx.Done():
		return op.snapshot(), ctx.Err()
	}
	return op.snapshot(), nil
}

// Status returns the operation for uid.
func (a *Agent) Status(uid string) (agentapi.CheckpointStatus, bool) {
	a.mu.Lock()
	op, ok := a.ops[uid]
	a.mu.Unlock()
	if !ok {
		return agentapi.CheckpointStatus{}, false
	}
	op.touch(a.cfg.Now())
	return op.snapshot(), true
}

// List returns every operation.
func (a *Agent) List() agentapi.CheckpointList {
	a.mu.Lock()
	defer a.mu.Unlock()
	l := agentapi.CheckpointList{Items: []agentapi.CheckpointStatus{}}
	for _, op := range a.ops {
		l.Items = append(l.Items, op.snapshot())
	}
	return l
}

// Delete forgets the operation for uid: a dump in flight is cancelled and a frozen app is thawed
// (the caller decided the pod stays).
func (a *Agent) Delete(uid string) bool {
	a.mu.Lock()
	op, ok := a.ops[uid]
	delete(a.ops, uid)
	a.mu.Unlock()
	if !ok {
		return false
	}
	op.cancel()
	<-op.done
	a.thaw(op, "checkpoint operation deleted")
	return true
}

func (op *operation) snapshot() agentapi.CheckpointStatus {
	op.mu.Lock()
	defer op.mu.Unlock()
	s := op.status
	s.Containers = append([]agentapi.ContainerResult(nil), op.status.Containers...)
	s.BytesWritten = op.bytes.Load()
	s.ExpectedBytes = op.expected.Load()
	op.progress(&s)
	return s
}

func (a *Agent) run(ctx context.Context, op *operation, req agentapi.CheckpointRequest) {
	log := a.cfg.Log.With().Str("pod", req.Pod.Namespace+"/"+req.Pod.Name).Str("uid", req.Pod.UID).Str("reason", req.Reason).Logger()
	op.mu.Lock()
	w := op.waiter
	op.mu.Unlock()
	release, err := a.sched.acquire(ctx, w)
	if err != nil {
		a.finish(op, req, false, "cancelled while waiting for a dump slot")
		close(op.done)
		return
	}
	began := time.Now()
	var base int64
	defer func() { release(base, time.Since(began)) }()
	op.mu.Lock()
	op.status.Phase = agentapi.PhaseRunning
	op.status.Message = "dumping"
	op.mu.Unlock()

	ok := true
	var dirs []*os.File
	defer func() {
		for _, d := range dirs {
			if ok { // else the checkpoints the webhook recorded last may be the ones to keep
				a.prune(log, req, d)
			}
			d.Close()
		}
	}()
	// One ID for the pod's containers: they are restored together, from one restore ID.
	id := checkpoint.NewID(a.cfg.Now())
	for _, c := range req.Containers {
		res, frozen, dir := a.dumpContainer(ctx, log, op, base, req, c, id)
		if dir != nil {
			dirs = append(dirs, dir)
		}
		base += res.Bytes
		op.bytes.Store(base)
		op.mu.Lock()
		op.status.Containers = append(op.status.Containers, res)
		if frozen != nil {
			op.frozen = append(op.frozen, *frozen)
		}
		op.mu.Unlock()
		if res.Phase != agentapi.PhaseSucceeded {
			ok = false
			break // the pod cannot be evicted anyway; thaw what was frozen
		}
	}
	msg := fmt.Sprintf("checkpointed %d container(s), %d bytes", len(req.Containers), base)
	if !ok {
		msg = "checkpoint failed: " + op.snapshot().Containers[len(op.snapshot().Containers)-1].Message
	}
	a.finish(op, req, ok, msg)
	if req.LeaveRunning {
		a.forget(op, req.Pod.UID) // the app runs on: the next request dumps again
	}
	if !ok || req.LeaveRunning {
		a.thaw(op, "checkpoint failed") // nothing was left frozen by a periodic one
		close(op.done)
		return
	}
	// The app stays frozen until its pod is deleted (the launcher then kills it); a pod that stays
	// must not stay frozen (release.go).
	a.holdFrozen(op, req.Pod)
	close(op.done) // before the deferred pruning: nothing waits for it
}

// queue puts the operation in the node's queue for a dump slot (schedule.go).
func (a *Agent) queue(op *operation, req agentapi.CheckpointRequest) {
	w := a.sched.enqueue(dumpUrgency(req))
	op.mu.Lock()
	op.sched, op.waiter = a.sched, w
	op.mu.Unlock()
}

// promote raises the urgency of the operation's place in the queue, if it waits for a slot.
func (op *operation) promote(u urgency) {
	op.mu.Lock()
	sched, w := op.sched, op.waiter
	op.mu.Unlock()
	if sched != nil && w != nil {
		sched.promote(w, u)
	}
}

// dumpUrgency: a termination's grace period runs, an eviction is retried, a periodic checkpoint
// leaves the app running.
func dumpUrgency(req agentapi.CheckpointRequest) urgency {
	switch {
	case req.Reason == ReasonTermination:
		return urgencyTermination
	case req.LeaveRunning:
		return urgencyPeriodic
	}
	return urgencyEviction
}

func (a *Agent) finish(op *operation, req agentapi.CheckpointRequest, ok bool, msg string) {
	now := a.cfg.Now().UTC()
	op.mu.Lock()
	op.status.FinishedAt = &now
	op.status.Message = msg
	if ok {
		op.status.Phase = agentapi.PhaseSucceeded
	} else {
		op.status.Phase = agentapi.PhaseFailed
	}
	op.mu.Unlock()
	lg := a.cfg.Log.Info()
	if !ok {
		lg = a.cfg.Log.Warn()
	}
	lg.Str("pod", req.Pod.Namespace+"/"+req.Pod.Name).Str("uid", req.Pod.UID).Msg(msg)
	// A success is the webhook's to announce (one "Checkpointed" Event, with the eviction or
	// suspend it was for, once the checkpoint is recorded); a failure is told here, with CRIU's
	// words, whoever asked.
	if a.cfg.Events != nil && req.Pod.Name != "" && !ok {
		a.cfg.Events.PodEvent(a.ctx, req.Pod, true, "CheckpointFailed", msg)
	}
}

// thaw resumes every app the operation left frozen (once).
func (a *Agent) thaw(op *operation, why string) {
	op.mu.Lock()
	frozen := op.frozen
	op.frozen = nil
	if op.timer != nil {
		op.timer.Stop()
	}
	pod := op.status.Pod
	op.mu.Unlock()
	if len(frozen) > 0 {
		a.forgetFrozen(pod.UID)
	}
	for _, t := range frozen {
		resumed, err := t.thaw()
		ev := a.cfg.Log.Info()
		if err != nil {
			ev = a.cfg.Log.Error().Err(err)
		}
		if resumed {
			a.cfg.Metrics.Thaws.Inc()
			ev.Str("uid", pod.UID).Int("pid", t.pid).Str("why", why).Msg("thawed the frozen app")
			if a.cfg.Events != nil && pod.Name != "" {
				a.cfg.Events.PodEvent(a.ctx, pod, false, "Thawed", "resumed the app frozen by its checkpoint: "+why)
			}
		}
	}
}
