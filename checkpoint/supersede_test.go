package checkpoint

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

// A pod whose checkpoint was restored into a replacement (the old pod cut off on a lost node)
// cannot commit another checkpoint: it would become the newest and roll the replacement back.
// The replacement's checkpoints, and the old pod's earlier ones, are untouched.
func TestSupersededPodCannotCommit(t *testing.T) {
	dir := t.TempDir()
	commit := func(uid string, at time.Time) (string, error) {
		w, err := Begin(dir, NewID(at))
		require.NoError(t, err)
		defer w.Close()
		require.NoError(t, os.WriteFile(filepath.Join(w.Path(), ImagesDir, "pages-1.img"), []byte(uid), 0o600))
		err = w.Commit(&Manifest{Container: "app", Pod: agentapi.PodRef{Namespace: "ns", Name: "p", UID: uid}})
		if err != nil {
			_, _ = w.Abort(false)
		}
		return w.Final(), err
	}
	now := time.Now()
	old, err := commit("old-pod", now)
	require.NoError(t, err)

	d := openDir(t, dir)
	require.NoError(t, Supersede(context.Background(), d, "old-pod"), "the replacement restored old-pod's checkpoint")
	require.NoError(t, Supersede(context.Background(), d, "old-pod"), "idempotent")
	_, err = commit("old-pod", now.Add(time.Minute))
	require.ErrorIs(t, err, ErrSuperseded)

	newer, err := commit("new-pod", now.Add(2*time.Minute))
	require.NoError(t, err, "the replacement checkpoints as usual")
	l, err := List(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Base(newer), filepath.Base(old)}, ids(l), "nothing partial of the refused commit is listed")

	assert.ErrorContains(t, Supersede(context.Background(), d, "../x"), "not a pod UID")
}
