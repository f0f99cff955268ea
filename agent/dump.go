package agent

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
)

// dumpContainer checkpoints one container: find its launcher, dump the nested init's tree from
// inside the container's namespaces (left stopped), copy checkpoint-files, record the process,
// and commit the checkpoint as id. It returns the frozen tree when the app was left stopped (also
// when a later step failed: the caller must thaw it then), and on success the container's
// checkpoint directory, open, for the caller to prune once the result is out (see prune).
func (a *Agent) dumpContainer(ctx context.Context, log zerolog.Logger, op *operation, base int64, req agentapi.CheckpointRequest, c agentapi.ContainerSpec, id string) (agentapi.ContainerResult, *frozenTree, *os.File) {
	res := agentapi.ContainerResult{Name: c.Name, Phase: agentapi.PhaseFailed}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, a.cfg.DumpTimeout)
	defer cancel()
	log = log.With().Str("container", c.Name).Logger()
	fail := func(err error) (agentapi.ContainerResult, *frozenTree, *os.File) {
		a.cfg.Metrics.DumpFailures.Inc()
		res.Message = err.Error()
		log.Error().Err(err).Msg("dump failed")
		return res, nil, nil
	}

	t, err := a.cfg.Finder.Find(ctx, req.Pod, c.Name)
	if err != nil {
		return fail(fmt.Errorf("finding container %q: %w", c.Name, err))
	}
	root, err := appRoot(t.PID)
	if err != nil {
		return fail(err)
	}
	rootInCtr, err := pidIn(root, t.PID)
	if err != nil {
		return fail(err)
	}
	hostRoot := fmt.Sprintf("/proc/%d/root", t.PID)
	hostDir := filepath.Join(hostRoot, c.Dir)
	w, err := checkpoint.Begin(hostDir, id)
	if err != nil {
		return fail(fmt.Errorf("checkpoint directory %s in the container: %w", c.Dir, err))
	}
	abort := func(err error) {
		kept, aerr := w.Abort(req.Diagnosis)
		if aerr != nil {
			log.Warn().Err(aerr).Msg("cleaning the failed checkpoint")
		} else if kept != "" {
			log.Info().Str("dir", kept).Msg("failed dump kept for diagnosis")
		}
	}

	// The user's options become a CRIU configuration the agent hands CRIU itself (a sealed memfd):
	// written into the pod's volume, a process of the pod could rewrite it before CRIU reads it.
	cfg, err := criurun.ConfigFileContent(c.CriuOptions)
	if err != nil {
		abort(err)
		return fail(fmt.Errorf("criuOptions: %w", err))
	}
	images, err := os.Open(filepath.Join(w.Path(), checkpoint.ImagesDir))
	if err != nil {
		abort(err)
		return fail(err)
	}
	defer images.Close()

	// Progress: the images' size, polled while CRIU writes.
	stop := make(chan struct{})
	go func() {
		tk := time.NewTicker(200 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				op.bytes.Store(base + dirSize(w.Path()))
			}
		}
	}()
	logLevel := int32(2)
	if req.Diagnosis {
		logLevel = 4
	}
	w.FollowImages(checkpoint.DumpLogName)
	dumpStart := time.Now()
	st, _ := criurun.StartTime(t.PID)
	err = criurun.Dump(ctx, criurun.DumpOptions{
		Bundle:    a.cfg.Criu,
		Join:      criurun.Join{PID: t.PID, StartTime: st},
		Pid:       rootInCtr,
		ImagesDir: images,
		LogFile:   checkpoint.DumpLogName,
		LogLevel:  logLevel,
		Config:    cfg,
	})
	close(stop)
	imgLog := filepath.Join(w.Path(), checkpoint.ImagesDir, checkpoint.DumpLogName)
	if err != nil {
		err = criurun.LogError("dump", err, imgLog)
		abort(err)
		return fail(err)
	}
	dumped := time.Now()
	frozen := newFrozenTree(root)
	failFrozen := func(err error) (agentapi.ContainerResult, *frozenTree, *os.File) {
		abort(err)
		r, _, _ := fail(err)
		return r, &frozen, nil
	}
	if err := w.ImagesWritten(); err != nil {
		return failFrozen(err)
	}
	if err := os.Rename(imgLog, filepath.Join(w.Path(), checkpoint.DumpLogName)); err != nil {
		return failFrozen(err)
	}

	m := &checkpoint.Manifest{
		Pod: req.Pod, Container: c.Name, Node: a.cfg.NodeName, Image: t.Image, ImageRef: t.ImageRef,
		Reason: req.Reason, CriuVersion: a.cfg.CriuVersion, Started: start.UTC(), Dumped: dumped.UTC(),
	}
	if err := processInfo(root, t.PID, m); err != nil {
		return failFrozen(err)
	}
	copied, err := checkpoint.CopyIn(hostRoot, c.Files, w.Path())
	if err != nil {
		return failFrozen(err)
	}
	m.CopiedFiles = copied
	if err := w.Commit(m); err != nil {
		return failFrozen(fmt.Errorf("committing the checkpoint: %w", err))
	}
	// The launcher of the next pod reads the checkpoint as the app's user.
	if uid, gid, err := processUID(t.PID); err == nil && uid != 0 {
		_ = os.Lchown(hostDir, uid, gid)
		_ = chownTree(w.Final(), uid, gid)
	}
	// Held open: the container (and with it /proc/<pid>/root) may be gone by the time of pruning.
	dirFile, err := os.Open(hostDir)
	if err != nil {
		log.Warn().Err(err).Msg("opening the checkpoint directory for pruning")
	}
	res.Phase = agentapi.PhaseSucceeded
	res.CheckpointID = id
	res.Bytes = m.Size
	res.Message = fmt.Sprintf("dump %.2fs, total %.2fs, %d bytes of images", dumped.Sub(dumpStart).Seconds(), time.Since(start).Seconds(), m.ImagesSize)
	a.cfg.Metrics.DumpDuration.Observe(time.Since(start).Seconds())
	a.cfg.Metrics.DumpBytes.Add(float64(m.Size))
	log.Info().Str("checkpoint", path.Join(c.Dir, id)).Int64("bytes", m.Size).Dur("criu", dumped.Sub(dumpStart)).Dur("total", time.Since(start)).Msg("checkpoint complete; app left frozen")
	return res, &frozen, dirFile
}

// prune removes the container's old checkpoints once the operation has reported success: removing
// the previous gigabytes takes the filesystem a while (0.4 s per GiB measured), and the eviction
// waiting on the new checkpoint has no reason to wait for that.
func (a *Agent) prune(log zerolog.Logger, req agentapi.CheckpointRequest, dir *os.File) {
	hostDir := fmt.Sprintf("/proc/self/fd/%d", dir.Fd())
	keep := a.cfg.KeepCheckpoints
	if req.Keep > 0 {
		keep = req.Keep + 1 // the webhook counts the checkpoints kept besides the new one
	}
	// A checkpoint directory without marker younger than a dump may still be written.
	if err := checkpoint.Prune(hostDir, keep, a.cfg.Now().Add(-a.cfg.DumpTimeout)); err != nil {
		log.Warn().Err(err).Msg("pruning old checkpoints")
	}
}

func dirSize(root string) int64 {
	var n int64
	_ = filepath.WalkDir(root, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func chownTree(root string, uid, gid int) error {
	return filepath.WalkDir(root, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
}
