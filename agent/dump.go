package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/internal/confine"
	"github.com/stasis-k8s/stasis/wiring"
)

// dump is one container's checkpoint in the making.
type dump struct {
	a     *Agent
	log   zerolog.Logger
	req   agentapi.CheckpointRequest
	c     agentapi.ContainerSpec
	t     Target
	app   int      // host PID of the dumped tree's root (the launcher's child)
	root  *os.File // the container's root, every path in it resolved confined
	dir   *os.File // the container's checkpoint directory (c.Dir)
	w     *checkpoint.Writer
	start time.Time
	ipcNS bool // the pod's IPC namespace was dumped with the tree (it holds SysV objects)
}

// dumpContainer checkpoints one container: find its launcher and the app under it, dump the app's
// tree with the agent's CRIU inside the container's namespaces (left stopped), copy
// checkpoint-files, record the process, and commit the checkpoint as id. It returns the frozen
// tree when the app was left stopped (also when a later step failed: the caller must thaw it
// then), and on success the container's checkpoint directory, open, for the caller to prune once
// the result is out (see prune).
func (a *Agent) dumpContainer(ctx context.Context, log zerolog.Logger, op *operation, base int64, req agentapi.CheckpointRequest, c agentapi.ContainerSpec, id string) (agentapi.ContainerResult, *frozenTree, *os.File) {
	res := agentapi.ContainerResult{Name: c.Name, Phase: agentapi.PhaseFailed}
	ctx, cancel := context.WithTimeout(ctx, a.cfg.DumpTimeout)
	defer cancel()
	d := &dump{a: a, log: log.With().Str("container", c.Name).Logger(), req: req, c: c, start: time.Now()}
	defer d.close()
	fail := func(err error, frozen *frozenTree) (agentapi.ContainerResult, *frozenTree, *os.File) {
		a.cfg.Metrics.DumpFailures.Inc()
		if d.w != nil {
			d.abort()
		}
		res.Message = err.Error()
		d.log.Error().Err(err).Msg("dump failed")
		return res, frozen, nil
	}
	if err := d.open(ctx, id); err != nil {
		return fail(err, nil)
	}
	op.expected.Store(base + treeAnonBytes(d.app)) // progress for the evicting client (progress.go)
	criuTime, err := d.runCriu(ctx, op, base)
	if err != nil {
		var frozen *frozenTree
		if errors.Is(err, criurun.ErrStreamAfterCriu) && !req.LeaveRunning {
			// CRIU finished and left the tree stopped; the checkpoint failed after it.
			t := newFrozenTree(d.app)
			frozen = &t
		}
		return fail(d.noRoomHint(err), frozen)
	}
	a.cfg.Metrics.FreezeSeconds.Observe(criuTime.Seconds())
	var frozen *frozenTree // nil: left running (a periodic checkpoint)
	if !req.LeaveRunning {
		t := newFrozenTree(d.app)
		frozen = &t
	}
	// Checked on the stopped tree: exactly the sockets CRIU dumped (sockets.go).
	if err := checkSockets(d.app, d.t.PID); err != nil {
		return fail(err, frozen)
	}
	m, err := d.commit(time.Now())
	if err != nil {
		return fail(d.noRoomHint(err), frozen)
	}
	// On disk: the checkpoint's files and the chunks its pack references; written: what this dump
	// added (chunks equal to the previous checkpoint's are referenced, not written).
	onDisk, written := m.Size, m.Size
	if m.Pack != nil {
		onDisk, written = onDisk+m.Pack.Stored, written+m.Pack.Written
	}
	res.Phase, res.CheckpointID, res.Bytes, res.ImageBytes = agentapi.PhaseSucceeded, id, onDisk, m.ImagesSize
	res.Generation = m.Generation
	res.Message = fmt.Sprintf("dump %.2fs, total %.2fs, %d bytes of images, %d bytes on disk, %d written", criuTime.Seconds(), time.Since(d.start).Seconds(), m.ImagesSize, onDisk, written)
	if len(m.Carried) > 0 {
		res.Message += fmt.Sprintf(", %d held file(s) carried from the container's filesystem", len(m.Carried))
	}
	a.cfg.Metrics.DumpDuration.Observe(time.Since(d.start).Seconds())
	a.cfg.Metrics.DumpBytes.Add(float64(written))
	left := "app left frozen"
	if req.LeaveRunning {
		left = "app running on"
	}
	d.log.Info().Str("checkpoint", path.Join(c.Dir, id)).Int64("bytes", onDisk).Int64("written", written).Dur("criu", criuTime).Dur("total", time.Since(d.start)).Msg("checkpoint complete; " + left)
	dir := d.dir
	d.dir = nil // the caller prunes through it, and closes it
	return res, frozen, dir
}

// open finds the container and the app, and begins the checkpoint below c.Dir. Every path in the
// container is resolved inside its root, by descriptor (see confine): a process of the pod that
// is not frozen (a sidecar, kubectl exec) can swap path components for symlinks while we work.
func (d *dump) open(ctx context.Context, id string) error {
	var err error
	if d.t, err = d.a.cfg.Finder.Find(ctx, d.req.Pod, d.c.Name); err != nil {
		return fmt.Errorf("finding container %q: %w", d.c.Name, err)
	}
	if d.app, err = appRoot(d.t.PID); err != nil {
		return err
	}
	if d.root, err = confine.OpenRoot(fmt.Sprintf("/proc/%d/root", d.t.PID)); err != nil {
		return fmt.Errorf("container root: %w", err)
	}
	if d.dir, err = confine.MkdirAll(d.root, d.c.Dir, 0o700); err != nil {
		return fmt.Errorf("checkpoint directory %s in the container: %w", d.c.Dir, err)
	}
	d.makeRoom(ctx)
	if d.w, err = checkpoint.BeginAt(d.dir, id); err != nil {
		return fmt.Errorf("checkpoint directory %s in the container: %w", d.c.Dir, err)
	}
	d.w.Key = d.a.cfg.ManifestKey
	d.w.Within(ctx) // the dump's deadline bounds copying, hashing and syncing too
	return nil
}

// runCriu dumps the app's tree, leaving it stopped, streaming its images into the checkpoint's
// pack. Progress is the size written so far.
func (d *dump) runCriu(ctx context.Context, op *operation, base int64) (time.Duration, error) {
	cfg, err := criurun.ConfigFileContent(d.c.CriuOptions)
	if err != nil {
		return 0, fmt.Errorf("criuOptions: %w", err)
	}
	pidInCtr, err := pidIn(d.app, d.t.PID)
	if err != nil {
		return 0, err
	}
	defer d.reportProgress(op, base)()
	logLevel := int32(2)
	if d.req.Diagnosis {
		logLevel = 4
	}
	st, _ := criurun.StartTime(d.t.PID)
	as, err := d.dumpCred()
	if err != nil {
		return 0, err
	}
	ipc, err := sysvObjects(d.t.PID) // ipc.go
	if err != nil {
		return 0, err
	}
	if d.ipcNS = ipc.any(); d.ipcNS {
		d.log.Info().Stringer("sysv", ipc).Msg("the pod's IPC namespace holds SysV objects: dumping it with the tree")
	}
	// The images go to the checkpoint's pack (compressed, encrypted, deduplicated against the
	// previous checkpoint, hashed and synced as they arrive), through the streamer, whose socket
	// lives in a directory of the agent's own, out of the pod's reach. CRIU's log (and its
	// stats-dump) go to the checkpoint's images directory.
	ring, err := d.a.keyRing()
	if err != nil {
		return 0, err
	}
	sink, err := d.w.Pack(ring, d.req.Pod.Namespace, checkpoint.PackOptions{Plain: d.a.cfg.PlainCheckpoints})
	if err != nil {
		return 0, fmt.Errorf("checkpoint store: %w", err)
	}
	stream, err := privateDir(d.a.cfg.RestoreDir, "stasis-dump-", as)
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(stream.Name())
	defer stream.Close()
	begin := time.Now()
	_, err = criurun.DumpStreamed(ctx, criurun.DumpOptions{
		Bundle:       d.a.cfg.Criu,
		Join:         criurun.Join{PID: d.t.PID, StartTime: st, As: as, DumpIPC: ipc.any()},
		Pid:          pidInCtr,
		ImagesDir:    d.w.Images(),
		LogFile:      checkpoint.DumpLogName,
		LogLevel:     logLevel,
		LeaveRunning: d.req.LeaveRunning,
		Config:       cfg,
	}, stream, sink)
	if err != nil {
		return 0, d.criuError(err)
	}
	return time.Since(begin), nil
}

// reportProgress publishes the bytes the dump wrote so far every 200 ms (the eviction's 429
// quotes them) until the returned stop is called.
func (d *dump) reportProgress(op *operation, base int64) (stop func()) {
	done := make(chan struct{})
	go func() {
		tk := time.NewTicker(200 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-done:
				return
			case <-tk.C:
				op.bytes.Store(base + d.w.Written())
			}
		}
	}()
	return func() { close(done) }
}

// criuError is a failed CRIU dump's error, quoting CRIU's log when it says why.
func (d *dump) criuError(err error) error {
	if errors.Is(err, criurun.ErrImageStream) || errors.Is(err, criurun.ErrStreamAfterCriu) {
		// The images did not reach the volume; CRIU failed only because the agent stopped taking
		// them (broken pipes), or succeeded: its log would hide the cause.
		return fmt.Errorf("criu dump: %w", err)
	}
	// CRIU's log, read through a descriptor: never a file a pod swapped in by symlink. The failed
	// checkpoint is removed, so the log has no place to name (with diagnosis on it is kept, and
	// the agent logs where).
	f, ferr := d.w.OpenFile(path.Join(checkpoint.ImagesDir, checkpoint.DumpLogName))
	if ferr != nil {
		return fmt.Errorf("criu dump failed: %w (its log cannot be read: %v)", err, ferr)
	}
	defer f.Close()
	return criurun.LogErrorAt("dump", err, fmt.Sprintf("/proc/self/fd/%d", f.Fd()), checkpoint.DumpLogName)
}

// keyRing is the checkpoint store's keys: derived from the manifest key, the namespaces' KEKs
// from NamespaceKeys when set.
func (a *Agent) keyRing() (*checkpoint.KeyRing, error) {
	r, err := checkpoint.NewKeyRing(a.cfg.ManifestKey, a.cfg.NamespaceKeys)
	if err != nil {
		return nil, fmt.Errorf("checkpoint store keys: %w", err)
	}
	return r, nil
}

// privateDir creates a directory of the agent's own below parent (0700), given to owner when set
// (the user CRIU runs as must reach the streamer's socket in it).
func privateDir(parent, prefix string, owner *criurun.Cred) (*os.File, error) {
	p, err := os.MkdirTemp(parent, prefix)
	if err != nil {
		return nil, fmt.Errorf("private directory: %w", err)
	}
	if owner != nil {
		if err := os.Chown(p, int(owner.UID), int(owner.GID)); err != nil {
			os.RemoveAll(p)
			return nil, fmt.Errorf("private directory: %w", err)
		}
	}
	f, err := os.Open(p)
	if err != nil {
		os.RemoveAll(p)
		return nil, fmt.Errorf("private directory: %w", err)
	}
	return f, nil
}

// dumpCred decides who CRIU dumps as, and logs it.
func (d *dump) dumpCred() (*criurun.Cred, error) {
	uid, gid, err := realIDs(d.app)
	if err != nil {
		return nil, err
	}
	eff, err := agentCapEff()
	if err != nil {
		return nil, err
	}
	as := dumpCredFor(uid, gid, eff)
	if as != nil {
		d.log.Info().Uint32("criu-uid", as.UID).Uint32("criu-gid", as.GID).Msg("dumping as the app's user (the agent lacks CAP_SYS_RESOURCE)")
	} else {
		d.log.Info().Uint32("app-uid", uid).Msg("dumping as root")
	}
	return as, nil
}

// capSysResource is CAP_SYS_RESOURCE's bit in a capability set.
const capSysResource = 1 << 24

// dumpCredFor is the decision: CRIU must read the rlimits of every process it dumps, and reading
// another user's needs CAP_SYS_RESOURCE ("Can't get rlimit 0: Operation not permitted"), which
// some VMs withhold even from root. Without it, CRIU dumps as the app's own user (uid and gid
// equal to the app's, so no capability is needed for its rlimits). With it, or for a root app, as
// root: the tested path of real nodes. agentEff is the agent's effective capability set.
func dumpCredFor(appUID, appGID uint32, agentEff uint64) *criurun.Cred {
	if appUID == 0 || agentEff&capSysResource != 0 {
		return nil
	}
	return &criurun.Cred{UID: appUID, GID: appGID}
}

// agentCapEff is the agent's effective capability set (CapEff of /proc/self/status).
func agentCapEff() (uint64, error) {
	v, err := statusField("self", "CapEff")
	if err != nil {
		return 0, err
	}
	eff, err := capSet(v)
	if err != nil {
		return 0, fmt.Errorf("/proc/self/status: CapEff %q: %w", v, err)
	}
	return eff, nil
}

// realIDs returns a process's real uid and gid (the first values of Uid and Gid in its status).
func realIDs(pid int) (uid, gid uint32, err error) {
	var ids [2]uint32
	for i, k := range []string{"Uid", "Gid"} {
		v, err := statusField(strconv.Itoa(pid), k)
		if err != nil {
			return 0, 0, err
		}
		n, err := strconv.ParseUint(strings.Fields(v)[0], 10, 32)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/%d/status: %s %q: %w", pid, k, v, err)
		}
		ids[i] = uint32(n)
	}
	return ids[0], ids[1], nil
}

// commit records the stopped tree and the checkpoint-files, writes the manifest and marks the
// checkpoint complete.
func (d *dump) commit(dumped time.Time) (*checkpoint.Manifest, error) {
	if err := d.w.ImagesWritten(); err != nil {
		return nil, err
	}
	if err := d.w.KeepLog(); err != nil {
		return nil, err
	}
	m := &checkpoint.Manifest{
		Pod: d.req.Pod, Identity: d.t.PodAnnotations[wiring.AnnotationIdentity], Container: d.c.Name,
		Node: d.a.cfg.NodeName, Image: d.t.Image, ImageRef: d.t.ImageRef,
		Reason: d.req.Reason, CriuVersion: d.a.cfg.CriuVersion, Started: d.start.UTC(), Dumped: dumped.UTC(),
		IPCNamespace: d.ipcNS, Owner: d.req.Owner,
	}
	err := processInfo(d.app, d.t.PID, m)
	if err != nil {
		return nil, err
	}
	if err = d.carryFiles(m, d.c.Files); err != nil {
		return nil, err
	}
	if m.CopiedFiles, err = d.w.CopyIn(d.root, d.c.Files, d.a.cfg.CopyLimits); err != nil {
		return nil, err
	}
	if err := d.w.Commit(m); err != nil {
		return nil, fmt.Errorf("committing the checkpoint: %w", err)
	}
	// The app's user owns its checkpoints (the launcher of the next pod reads them as that user).
	if uid, gid, err := processUID(d.t.PID); err == nil && uid != 0 {
		if err := d.w.Chown(uid, gid); err != nil {
			d.log.Warn().Err(err).Msg("giving the checkpoint to the app's user")
		}
	}
	return m, nil
}

func (d *dump) abort() {
	kept, err := d.w.Abort(d.req.Diagnosis)
	if err != nil {
		d.log.Warn().Err(err).Msg("cleaning the failed checkpoint")
	} else if kept != "" {
		d.log.Info().Str("dir", path.Join(d.c.Dir, kept)).Msg("failed dump kept for diagnosis")
	}
	d.w = nil
}

func (d *dump) close() {
	for _, f := range []*os.File{d.root, d.dir} {
		if f != nil {
			f.Close()
		}
	}
	if d.w != nil {
		d.w.Close()
	}
}

// prune removes the container's old checkpoints once the operation has reported success: removing
// the previous gigabytes takes the filesystem a while (0.4 s per GiB measured), and the eviction
// waiting on the new checkpoint has no reason to wait for that. dir is a descriptor held since
// the commit: the container (and with it /proc/<pid>/root) may be gone by now.
func (a *Agent) prune(log zerolog.Logger, req agentapi.CheckpointRequest, dir *os.File) {
	older := a.cfg.KeepOlder
	if req.Keep > 0 {
		older = req.Keep
	}
	// A checkpoint directory without marker younger than a dump may still be written.
	if err := checkpoint.PruneAt(dir, older+1, a.cfg.Now().Add(-a.cfg.DumpTimeout)); err != nil {
		log.Warn().Err(err).Msg("pruning old checkpoints")
	}
}
