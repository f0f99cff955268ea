package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/internal/confine"
	"github.com/stasis-k8s/stasis/wiring"
)

// writeCheckpoint makes a complete checkpoint of one container (fake images: no CRIU needed to
// decide plans) and returns its directory.
func writeCheckpoint(t *testing.T, identityDir, container, id string) string {
	t.Helper()
	return writeCheckpointKey(t, identityDir, container, id, testKey)
}

func writeCheckpointKey(t *testing.T, identityDir, container, id string, key checkpoint.Key) string {
	t.Helper()
	w, err := checkpoint.Begin(filepath.Join(identityDir, container), id)
	require.NoError(t, err)
	w.Key = key
	require.NoError(t, os.WriteFile(filepath.Join(w.Path(), checkpoint.ImagesDir, "pages-1.img"), []byte("memory of "+container), 0o600))
	require.NoError(t, w.Commit(&checkpoint.Manifest{Container: container}))
	return w.Final()
}

// corruptPages flips the first byte of the pages image (same size: only its sha256 tells).
func corruptPages(t *testing.T, ckpt string) {
	t.Helper()
	p := filepath.Join(ckpt, checkpoint.ImagesDir, "pages-1.img")
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	b[0] ^= 0xff
	require.NoError(t, os.WriteFile(p, b, 0o600))
}

// A pod's containers restore together or not at all; with several, their images are verified up
// front. The checkpoints are read below the container's root, through descriptors.
func TestPreparePod(t *testing.T) {
	id := checkpoint.NewID(time.Now())
	tests := []struct {
		name       string
		containers []string
		damage     func(t *testing.T, dir string)
		restore    []bool
		verified   bool   // images checked before any restore
		reason     string // in every refusal
		failed     string // the container the others name
	}{
		{"one container", []string{"app"}, nil, []bool{true}, false, "", ""},
		{"one container, corrupt image: left to the restore", []string{"app"},
			func(t *testing.T, dir string) { corruptPages(t, filepath.Join(dir, "app", id)) }, []bool{true}, false, "", ""},
		{"two containers", []string{"app", "sidecar"}, nil, []bool{true, true}, true, "", ""},
		{"two containers, one corrupt image: neither restores", []string{"app", "sidecar"},
			func(t *testing.T, dir string) { corruptPages(t, filepath.Join(dir, "sidecar", id)) }, []bool{false, false}, false,
			"images/pages-1.img: sha256", "sidecar"},
		{"two containers, one checkpoint missing: neither restores", []string{"app", "sidecar"},
			func(t *testing.T, dir string) { require.NoError(t, os.RemoveAll(filepath.Join(dir, "app", id))) }, []bool{false, false}, false,
			"no such file", "app"},
		{"a checkpoint the pod wrote itself (plain sha256 marker): refused", []string{"app"},
			func(t *testing.T, dir string) {
				require.NoError(t, os.RemoveAll(filepath.Join(dir, "app", id)))
				writeCheckpointKey(t, dir, "app", id, nil)
			}, []bool{false}, false, "not signed by this cluster's Stasis agents", ""},
		{"a checkpoint signed with another key: refused", []string{"app"},
			func(t *testing.T, dir string) {
				require.NoError(t, os.RemoveAll(filepath.Join(dir, "app", id)))
				writeCheckpointKey(t, dir, "app", id, checkpoint.Key("another cluster's key, 32 bytes and more"))
			}, []bool{false}, false, "not signed by this cluster's Stasis agents", ""},
		{"a checkpoint directory swapped for a symlink to the host: refused", []string{"app"},
			func(t *testing.T, dir string) {
				host := filepath.Dir(writeCheckpoint(t, t.TempDir(), "app", id))
				require.NoError(t, os.RemoveAll(filepath.Join(dir, "app")))
				require.NoError(t, os.Symlink(host, filepath.Join(dir, "app")))
			}, []bool{false}, false, "no such file", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctrRoot := t.TempDir()
			identityDir := "/stasis/checkpoints/" + wiring.IdentityDir("job/ns/j/0")
			dir := filepath.Join(ctrRoot, identityDir)
			for _, c := range tt.containers {
				writeCheckpoint(t, dir, c, id)
			}
			if tt.damage != nil {
				tt.damage(t, dir)
			}
			root, err := confine.OpenRoot(ctrRoot)
			require.NoError(t, err)
			defer root.Close()
			ring, err := checkpoint.NewKeyRing(testKey, nil)
			require.NoError(t, err)
			plans := preparePod(root, identityDir, wiring.RestoreRef{ID: id, Containers: tt.containers}, ring)
			require.Len(t, plans, len(tt.containers))
			for i, c := range tt.containers {
				p := plans[c]
				assert.Equal(t, tt.restore[i], p.err == nil, "container %s: %v", c, p.err)
				assert.Equal(t, tt.verified, p.imagesVerified && p.err == nil, c)
				if tt.reason != "" {
					assert.ErrorContains(t, p.err, tt.reason, c)
				}
				if tt.failed != "" && c != tt.failed {
					assert.ErrorContains(t, p.err, "container "+tt.failed+" cannot restore", c)
				}
				if p.dir != nil {
					p.dir.Close()
				}
			}
		})
	}
}

// An authentic checkpoint restores only where it belongs: same namespace, identity, container and
// image.
func TestRestoreBinding(t *testing.T) {
	m := &checkpoint.Manifest{ID: "c1", Pod: agentapi.PodRef{Namespace: "team-a"}, Identity: "job/team-a/train/0", Container: "app", ImageRef: "sha256:aaa", Owner: "job-uid-1"}
	req := agentapi.RestoreRequest{Pod: agentapi.PodRef{Namespace: "team-a"}, Container: "app"}
	assert.NoError(t, bound(m, req, "job/team-a/train/0", "sha256:aaa", "job-uid-1"))
	assert.NoError(t, bound(m, req, "job/team-a/train/0", "", "job-uid-1"), "image unknown to the runtime: not compared")
	other := req
	other.Pod.Namespace = "team-b"
	assert.ErrorContains(t, bound(m, other, "job/team-a/train/0", "sha256:aaa", "job-uid-1"), `taken in namespace "team-a"`)
	assert.ErrorContains(t, bound(m, req, "job/team-a/train/1", "sha256:aaa", "job-uid-1"), `belongs to identity "job/team-a/train/0"`)
	side := req
	side.Container = "side"
	assert.ErrorContains(t, bound(m, side, "job/team-a/train/0", "sha256:aaa", "job-uid-1"), `of container "app"`)
	assert.ErrorContains(t, bound(m, req, "job/team-a/train/0", "sha256:bbb", "job-uid-1"), "taken of image sha256:aaa")
	assert.ErrorContains(t, bound(m, req, "job/team-a/train/0", "sha256:aaa", "job-uid-2"), "taken under controller job-uid-1",
		"a Job re-created under the same name is another incarnation")
	assert.NoError(t, bound(m, req, "job/team-a/train/0", "sha256:aaa", ""), "a pod wired by an older Stasis: not compared")
}
