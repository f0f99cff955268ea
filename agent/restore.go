package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/internal/confine"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/wiring"
)

// Restore is the agent's side of a launcher's restore request: it checks who asks, decides for
// the whole pod whether its checkpoint is restorable, restores the caller's container with the
// agent's CRIU inside the container's namespaces, serving it images verified as they are read, and
// resumes the app. It records the outcome (log, metric, Event). A refused request is an error
// (ErrNotCaller: HTTP 403); anything wrong with the checkpoint is Restored=false (a cold start).
func (a *Agent) Restore(ctx context.Context, callerPID int, req agentapi.RestoreRequest) (agentapi.RestoreResponse, error) {
	t, err := a.cfg.Finder.Find(ctx, req.Pod, req.Container)
	if err != nil {
		return agentapi.RestoreResponse{}, fmt.Errorf("%w: %v", ErrNotCaller, err)
	}
	if t.PID != callerPID {
		return agentapi.RestoreResponse{}, fmt.Errorf("%w: process %d is not PID 1 of container %q of pod %s", ErrNotCaller, callerPID, req.Container, req.Pod.UID)
	}
	log := a.cfg.Log.With().Str("pod", req.Pod.Namespace+"/"+req.Pod.Name).Str("container", req.Container).Logger()
	res := agentapi.RestoreResponse{CheckpointID: req.CheckpointID}
	pid, id, msg, err := a.restore(ctx, log, t, req)
	switch {
	case errors.Is(err, errNoCheckpoint) && req.CheckpointID == "":
		// A first start: nothing to continue, nothing to report.
		a.cfg.Metrics.RestoreResults.WithLabelValues("none").Inc()
		res.Message = err.Error()
		return res, nil
	case err != nil:
		res.Message = err.Error()
	default:
		res.Restored, res.PID, res.Message, res.CheckpointID = true, pid, msg, id
		req.CheckpointID = id
	}
	a.recordRestore(ctx, log, req, res)
	return res, nil
}

// ErrNotCaller refuses a restore asked by anyone but the container's own PID 1.
var ErrNotCaller = errors.New("only the container's PID 1 may ask to restore it")

// restore does the work; any error means a cold start.
func (a *Agent) restore(ctx context.Context, log zerolog.Logger, t Target, req agentapi.RestoreRequest) (pid int, id, msg string, err error) {
	if t.Attempt > 0 {
		// The pod was created to continue the checkpoint once. A container restarted in place (a
		// crash, an OOM kill, a failed liveness probe) has run on since: restoring the old state
		// again would repeat its work and put old files over newer ones, and a checkpoint that
		// crashes would crash-loop.
		return 0, "", "", fmt.Errorf("container %q restarted in place (restart %d): the checkpoint %s was for its first start and is consumed; starting afresh", req.Container, t.Attempt, req.CheckpointID)
	}
	if err := labels.CheckOptions(req.Options, labels.RestoreOptions); err != nil {
		return 0, "", "", err
	}
	root, err := confine.OpenRoot(fmt.Sprintf("/proc/%d/root", t.PID))
	if err != nil {
		return 0, "", "", fmt.Errorf("container root: %w", err)
	}
	defer root.Close()
	ref, identity, err := a.restoreTarget(root, t.PodAnnotations, req)
	if err != nil {
		return 0, "", "", err
	}
	if ref.ID != req.CheckpointID {
		log.Info().Str("recorded", req.CheckpointID).Str("newest", ref.ID).Msg("restoring the newest checkpoint of the identity (taken on termination, not recorded)")
	}
	ring, err := a.keyRing()
	if err != nil {
		return 0, "", "", err
	}
	plan, err := a.podPlans(req.Pod.UID, func() map[string]*restorePlan {
		return preparePod(root, path.Join(a.cfg.CheckpointMount, wiring.IdentityDir(identity)), ref, ring)
	}).get(req.Container)
	if err != nil {
		return 0, "", "", err
	}
	owner := ""
	if spec, err := checkpointSpec(t.PodAnnotations); err == nil {
		owner = spec.Owner
	}
	if err := bound(plan.m, req, identity, t.ImageRef, owner); err != nil {
		return 0, "", "", err
	}
	timeout := a.cfg.RestoreTimeout
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	pid, err = a.restoreContainer(rctx, log, t, root, plan, req)
	if err != nil && rctx.Err() != nil {
		err = fmt.Errorf("restore did not finish within %s (--restore-timeout): %w", timeout, err)
	}
	if err != nil {
		return 0, "", "", err
	}
	if plan.m.Pod.UID != "" && plan.m.Pod.UID != req.Pod.UID {
		// This pod carries the old pod's work on: fence the old one, which may still run on a
		// node that lost contact, so that none of its later checkpoints can roll this one back.
		if err := checkpoint.Supersede(ctx, plan.cdir, plan.m.Pod.UID); err != nil {
			log.Warn().Err(err).Str("replaced", plan.m.Pod.UID).Msg("could not mark the replaced pod superseded")
		}
	}
	return pid, ref.ID, fmt.Sprintf("restored checkpoint %s (%d bytes of images) in %.2fs", ref.ID, plan.m.ImagesSize, time.Since(start).Seconds()), nil
}

// bound checks that an authentic checkpoint belongs where it is restored: the same namespace,
// identity and container, the same image (by the digest the runtime resolved, when both are
// known) and the same controller incarnation (when both are known). A pod cannot move another identity's checkpoint under its own name and have it restored.
func bound(m *checkpoint.Manifest, req agentapi.RestoreRequest, identity, imageRef, owner string) error {
	switch {
	case m.Pod.Namespace != req.Pod.Namespace:
		return fmt.Errorf("checkpoint %s was taken in namespace %q, not %q", m.ID, m.Pod.Namespace, req.Pod.Namespace)
	case m.Identity != identity:
		return fmt.Errorf("checkpoint %s belongs to identity %q, not %q", m.ID, m.Identity, identity)
	case m.Container != req.Container:
		return fmt.Errorf("checkpoint %s is of container %q, not %q", m.ID, m.Container, req.Container)
	case m.ImageRef != "" && imageRef != "" && m.ImageRef != imageRef:
		return fmt.Errorf("checkpoint %s was taken of image %s; this container runs %s", m.ID, m.ImageRef, imageRef)
	case m.Owner != "" && owner != "" && m.Owner != owner:
		return fmt.Errorf("checkpoint %s was taken under controller %s; this pod belongs to %s (a Job re-created under the same name, a new rollout): starting afresh", m.ID, m.Owner, owner)
	}
	return nil
}

// restoreRef reads what the webhook decided: the checkpoint to restore and the identity.
func restoreRef(ann map[string]string) (wiring.RestoreRef, string, error) {
	var ref wiring.RestoreRef
	v, ok := ann[wiring.AnnotationRestore]
	if !ok {
		return ref, "", fmt.Errorf("the pod has no %s annotation: it was not created to restore a checkpoint", wiring.AnnotationRestore)
	}
	if err := json.Unmarshal([]byte(v), &ref); err != nil {
		return ref, "", fmt.Errorf("annotation %s: %w", wiring.AnnotationRestore, err)
	}
	identity := ann[wiring.AnnotationIdentity]
	if identity == "" {
		return ref, "", fmt.Errorf("the pod has no %s annotation", wiring.AnnotationIdentity)
	}
	if !checkpoint.ValidID(ref.ID) {
		return ref, "", fmt.Errorf("annotation %s: %q is not a checkpoint id", wiring.AnnotationRestore, ref.ID)
	}
	return ref, identity, nil
}

// restorePlan is one container's checkpoint, checked, held open.
type restorePlan struct {
	cdir           *os.File // the container's directory <identity>/<container> (its chunk store)
	dir            *os.File // the checkpoint directory <identity>/<container>/<id>
	m              *checkpoint.Manifest
	imagesVerified bool // checked up front (pods with several restoring containers)
	err            error
}

// podRestore is the plans of one pod's restoring containers, decided once for all of them.
type podRestore struct {
	once  sync.Once
	plans map[string]*restorePlan
}

func (p *podRestore) get(container string) (*restorePlan, error) {
	pl, ok := p.plans[container]
	if !ok {
		return nil, fmt.Errorf("container %q is not among the pod's restoring containers", container)
	}
	return pl, pl.err
}

// podPlans returns the pod's plans, computing them with prepare on the first call. They are
// forgotten after a while (the descriptors closed): a pod's containers start within seconds.
func (a *Agent) podPlans(uid string, prepare func() map[string]*restorePlan) *podRestore {
	a.mu.Lock()
	p, ok := a.restores[uid]
	if !ok {
		p = &podRestore{}
		a.restores[uid] = p
		time.AfterFunc(a.cfg.RestoreTimeout+time.Minute, func() {
			a.mu.Lock()
			delete(a.restores, uid)
			a.mu.Unlock()
			for _, pl := range p.plans {
				for _, d := range []*os.File{pl.dir, pl.cdir} {
					if d != nil {
						d.Close()
					}
				}
			}
		})
	}
	a.mu.Unlock()
	p.once.Do(func() { p.plans = prepare() })
	return p
}

// preparePod checks the checkpoint of every restoring container. They restore together or not
// at all: one restored beside a sibling that starts afresh would see a partner whose state went
// back to zero. With several containers the images are verified here, before any of them
// restores; a single container's images are verified as the streamer serves them. The checkpoint
// volume is the same in every container of the pod, so the caller's root reaches them all.
func preparePod(root *os.File, identityDir string, ref wiring.RestoreRef, ring *checkpoint.KeyRing) map[string]*restorePlan {
	names := ref.Containers
	plans := map[string]*restorePlan{}
	var failed string
	for _, c := range names {
		pl := &restorePlan{}
		plans[c] = pl
		dir := path.Join(identityDir, c, ref.ID)
		if pl.cdir, pl.err = confine.Open(root, path.Dir(dir), unix.O_RDONLY|unix.O_DIRECTORY); pl.err == nil {
			pl.dir, pl.err = confine.OpenBeneath(pl.cdir, ref.ID, unix.O_RDONLY|unix.O_DIRECTORY)
		}
		if pl.err == nil {
			pl.m, pl.err = checkpoint.CheckAt(pl.dir, ref.ID, ring.Manifest())
		}
		if pl.err == nil && len(names) > 1 {
			pl.err, pl.imagesVerified = verifyImages(pl, ring), true
		}
		if pl.err != nil {
			pl.err = fmt.Errorf("checkpoint %s of container %s: %w", dir, c, pl.err)
			if failed == "" {
				failed = c
			}
		}
	}
	if failed != "" {
		for c, pl := range plans {
			if c != failed {
				pl.err = fmt.Errorf("container %s cannot restore (%v): the containers of a pod restore together or not at all", failed, plans[failed].err)
			}
		}
	}
	return plans
}

// verifyImages checks every image of a plan up front: its pack's chunks, or its image files.
func verifyImages(pl *restorePlan, ring *checkpoint.KeyRing) error {
	if pl.m.Pack == nil {
		return checkpoint.VerifyImagesAt(pl.dir, pl.m)
	}
	pr, err := checkpoint.OpenPack(pl.cdir, pl.m, ring)
	if err != nil {
		return err
	}
	defer pr.Close()
	return pr.Verify(context.Background())
}

// restoreContainer puts the checkpoint-files back, runs CRIU inside the container's namespaces and
// resumes the restored tree. It returns the restored root's PID as
// seen in the container.
func (a *Agent) restoreContainer(ctx context.Context, log zerolog.Logger, t Target, root *os.File, plan *restorePlan, req agentapi.RestoreRequest) (int, error) {
	options := req.Options
	// Carried files first: a checkpoint-files path over one of them is the user's, and wins.
	if err := checkpoint.PutBackCarriedAt(plan.dir, plan.m, root); err != nil {
		return 0, fmt.Errorf("putting the carried files back: %w", err)
	}
	if err := checkpoint.PutBackAt(plan.dir, plan.m, root); err != nil {
		return 0, fmt.Errorf("putting the checkpoint files back: %w", err)
	}
	inherit, err := inheritFDs(t.PID, root, plan.m)
	defer func() {
		for _, in := range inherit {
			in.File.Close()
		}
	}()
	if err != nil {
		return 0, err
	}
	if a.noLazy == nil {
		pid, err := a.restoreLazily(ctx, log, t, plan, inherit, req)
		if !errors.Is(err, errLazyUnavailable) {
			return pid, err
		}
		log.Warn().Err(err).Msg("lazy restore not possible: restoring fully")
	}
	start := time.Now()
	// CRIU reads the images from the agent's streamer, which serves only bytes verified against
	// the signed manifest (the pod can still write its checkpoint volume): what CRIU parses, as
	// root, is exactly what the agent wrote. The socket and CRIU's log are in a
	// directory of the agent's own.
	work, err := privateDir(a.cfg.RestoreDir, "stasis-restore-", nil)
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(work.Name())
	defer work.Close()
	ring, err := a.keyRing()
	if err != nil {
		return 0, err
	}
	pack, err := checkpoint.OpenPack(plan.cdir, plan.m, ring)
	if err != nil {
		return 0, fmt.Errorf("checkpoint %s: %w", plan.m.ID, err)
	}
	defer pack.Close()
	src := &criurun.FixingSource{ImageSource: corruptOnError{pack}}
	st, _ := criurun.StartTime(t.PID)
	log.Info().Str("checkpoint", plan.m.ID).Int("inheritFDs", len(inherit)).Msg("restoring")
	pid, _, err := criurun.RestoreStreamed(ctx, criurun.RestoreOptions{
		Bundle: a.cfg.Criu, Join: criurun.Join{PID: t.PID, StartTime: st, Cgroups: true},
		WorkDir: work, LogFile: "restore.log", Inherit: inherit, Extra: options,
	}, work, src)
	if fx := src.Fixes(); fx != (criurun.Fixes{}) {
		log.Info().Int("timerfds-rearmed", fx.Timers).Int("udp-rebound", fx.UDP).Msg("images adapted to the new pod")
	}
	host := 0
	if err == nil {
		host, err = hostPID(t.PID, pid)
	}
	if err == nil {
		err = noMoreThanItsContainer(host, t.PID)
	}
	if err != nil {
		killChildren(t.PID) // the restored or half-restored tree: nothing else is the launcher's yet
		err = criurun.LogError("restore", err, work.Name()+"/restore.log")
		if errors.Is(err, errCorrupt) {
			err = fmt.Errorf("corrupt checkpoint %s: %w", plan.m.ID, err)
		}
		return 0, err
	}
	if err := criurun.SignalTree(host, syscall.SIGCONT); err != nil {
		_ = criurun.SignalTree(host, syscall.SIGKILL)
		return 0, fmt.Errorf("resuming the restored tree: %w", err)
	}
	a.observeFullRestore(time.Since(start))
	return pid, nil
}

// errCorrupt marks an image the pack refused to serve (a chunk that fails its check).
var errCorrupt = errors.New("image refused")

// corruptOnError marks the errors of a source's images with errCorrupt.
type corruptOnError struct{ checkpoint.ImageSource }

func (c corruptOnError) Open(name string) (io.ReadCloser, error) {
	r, err := c.ImageSource.Open(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", errCorrupt, err)
	}
	return corruptReader{r}, nil
}

type corruptReader struct{ io.ReadCloser }

func (c corruptReader) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("%w: %w", errCorrupt, err)
	}
	return n, err
}

// hostPID finds the restored root among the launcher's children by its PID in the container
// (CRIU has exited: its orphans are the launcher's).
func hostPID(launcher, inCtr int) (int, error) {
	for _, c := range criurun.Children(launcher) {
		if p, err := pidIn(c, launcher); err == nil && p == inCtr {
			return c, nil
		}
	}
	return 0, fmt.Errorf("the restored root (PID %d in the container) is not a child of the container's PID 1", inCtr)
}

// killChildren kills whatever a failed restore left under the launcher (a half-restored tree):
// nothing else is its child before the app starts.
func killChildren(launcher int) {
	for _, c := range criurun.Children(launcher) {
		_ = criurun.SignalTree(c, syscall.SIGKILL)
	}
}

// inheritFDs hands CRIU what cannot be reopened from the images: the stdio pipes of the old
// container (the launcher's own fds 0, 1, 2 are the new container's, reopened through /proc), and
// open files whose size changed since the dump (CRIU refuses them with "has bad size"), opened
// inside the container's root.
func inheritFDs(launcher int, root *os.File, m *checkpoint.Manifest) ([]criurun.InheritFD, error) {
	var out []criurun.InheritFD
	seen := map[string]bool{}
	for fd, target := range m.Stdio {
		if fd > 2 || seen[target] || !(len(target) > 6 && (target[:6] == "pipe:[" || target[:6] == "socket")) {
			continue
		}
		flags := os.O_WRONLY
		if fd == 0 {
			flags = os.O_RDONLY
		}
		f, err := os.OpenFile(fmt.Sprintf("/proc/%d/fd/%d", launcher, fd), flags, 0)
		if err != nil {
			return out, fmt.Errorf("the new container's fd %d for %s: %w", fd, target, err)
		}
		seen[target] = true
		out = append(out, criurun.InheritFD{Key: target, File: f})
	}
	for _, of := range m.OpenFiles {
		if seen[of.Path] || !path.IsAbs(of.Path) {
			continue
		}
		f, err := confine.Open(root, of.Path, (of.Flags&(os.O_RDONLY|os.O_WRONLY|os.O_RDWR|os.O_APPEND))|unix.O_NONBLOCK)
		if err != nil {
			continue // missing: CRIU's to report
		}
		st, err := confine.Stat(f)
		if err != nil || !confine.IsReg(&st) || st.Size == of.Size {
			f.Close() // unchanged ones CRIU reopens itself
			continue
		}
		if of.Flags&os.O_APPEND == 0 {
			if _, err := f.Seek(of.Pos, 0); err != nil {
				f.Close()
				return out, fmt.Errorf("seek %s: %w", of.Path, err)
			}
		}
		seen[of.Path] = true
		out = append(out, criurun.InheritFD{Key: criurun.InheritKey(of.Path), File: f})
	}
	return out, nil
}

// recordRestore logs, counts and records an Event for a restore's outcome.
func (a *Agent) recordRestore(ctx context.Context, log zerolog.Logger, req agentapi.RestoreRequest, res agentapi.RestoreResponse) {
	result, reason := "restored", "Restored"
	ev := log.Info()
	msg := fmt.Sprintf("container %s: %s", req.Container, res.Message)
	if !res.Restored {
		result, reason, ev = "cold-start", "RestoreFailed", log.Warn()
		msg = fmt.Sprintf("container %s: cold start instead of restoring checkpoint %s: %s", req.Container, req.CheckpointID, res.Message)
	}
	a.cfg.Metrics.RestoreResults.WithLabelValues(result).Inc()
	ev.Str("checkpoint", req.CheckpointID).Bool("restored", res.Restored).Msg(res.Message)
	if a.cfg.Events != nil && req.Pod.Name != "" {
		a.cfg.Events.PodEvent(ctx, req.Pod, !res.Restored, reason, msg)
	}
}

// noMoreThanItsContainer checks every restored process, still stopped, against the container's
// PID 1: no capability outside its bounding set, and no_new_privs and seccomp at least as strict.
// The agent restores as root what the images say; the images are its own (authenticated, copied),
// and this is the second line: a restored app never holds more than its container could give it.
func noMoreThanItsContainer(root, launcher int) error {
	limit, err := procStatus(strconv.Itoa(launcher))
	if err != nil {
		return err
	}
	bnd, _ := capSet(limit["CapBnd"])
	for _, p := range criurun.Descendants(root) {
		st, err := procStatus(strconv.Itoa(p))
		if err != nil {
			continue // exited
		}
		for _, k := range []string{"CapPrm", "CapEff", "CapBnd", "CapInh", "CapAmb"} {
			if set, _ := capSet(st[k]); set&^bnd != 0 {
				return fmt.Errorf("restored process %d has %s %s beyond its container's bounding set %s", p, k, st[k], limit["CapBnd"])
			}
		}
		if st["NoNewPrivs"] < limit["NoNewPrivs"] || st["Seccomp"] < limit["Seccomp"] {
			return fmt.Errorf("restored process %d has NoNewPrivs %s, Seccomp %s: less strict than its container's (%s, %s)",
				p, st["NoNewPrivs"], st["Seccomp"], limit["NoNewPrivs"], limit["Seccomp"])
		}
	}
	return nil
}
