package agent

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// A dump needs about as much room on the checkpoint volume as the container's last checkpoint.
// Older checkpoints are normally pruned after a new one is complete (the eviction does not wait
// for that); when the volume is too full for the new one, they go first: all but the newest,
// which stays until its successor is complete. A dump that still does not fit fails with ENOSPC,
// cleanly (its partial images removed, the newest checkpoint intact), and says so.

// roomMargin is the share of the last checkpoint's size added for growth between two dumps.
const roomMargin = 0.25

// makeRoom prunes the container's older checkpoints before the dump when the volume's free space
// is below what the last checkpoint took, plus a margin.
func (d *dump) makeRoom(ctx context.Context) {
	need, err := checkpoint.NewestSize(d.dir)
	if err != nil || need == 0 {
		return
	}
	free, err := freeBytes(d.dir.Fd())
	want := need + int64(float64(need)*roomMargin)
	if err != nil || free >= want {
		return
	}
	if err := checkpoint.MakeRoom(ctx, d.dir, d.a.cfg.Now().Add(-d.a.cfg.DumpTimeout)); err != nil {
		d.log.Warn().Err(err).Msg("pruning older checkpoints to make room")
		return
	}
	after, _ := freeBytes(d.dir.Fd())
	d.log.Info().Int64("free", free).Int64("freeAfter", after).Int64("lastCheckpoint", need).
		Msg("the checkpoint volume was short of room: pruned all but the newest checkpoint before the dump")
}

// freeBytes is the space available to unprivileged writers on the filesystem of fd.
func freeBytes(fd uintptr) (int64, error) {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(int(fd), &sfs); err != nil {
		return 0, err
	}
	return int64(sfs.Bavail) * sfs.Bsize, nil
}

// noRoomHint explains a failed dump on a full volume.
func (d *dump) noRoomHint(err error) error {
	free, ferr := freeBytes(d.dir.Fd())
	if ferr != nil || free > 1<<20 {
		return err
	}
	return fmt.Errorf("the checkpoint volume %s is full (%d bytes free; the newest complete checkpoint is kept): %w", d.c.Dir, free, err)
}
