package podtools

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// writeCheckpoint makes a complete checkpoint of one container (fake images: no CRIU needed to
// decide plans) and returns its directory.
func writeCheckpoint(t *testing.T, identityDir, container, id string) string {
	t.Helper()
	w, err := checkpoint.Begin(filepath.Join(identityDir, container), id)
	require.NoError(t, err)
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

func TestPreparePod(t *testing.T) {
	id := checkpoint.NewID(time.Now())
	tests := []struct {
		name       string
		containers []string
		damage     func(t *testing.T, dir string)
		restore    []bool
		verified   bool   // images checked by restore-prepare
		reason     string // in every plan's reason
		failed     string // the container the others name
	}{
		{"one container", []string{"app"}, nil, []bool{true}, false, "", ""},
		{"one container, corrupt image: left to its launcher", []string{"app"},
			func(t *testing.T, dir string) { corruptPages(t, filepath.Join(dir, "app", id)) }, []bool{true}, false, "", ""},
		{"two containers", []string{"app", "sidecar"}, nil, []bool{true, true}, true, "", ""},
		{"two containers, one corrupt image: neither restores", []string{"app", "sidecar"},
			func(t *testing.T, dir string) { corruptPages(t, filepath.Join(dir, "sidecar", id)) }, []bool{false, false}, false,
			"corrupt checkpoint: images/pages-1.img: sha256", "sidecar"},
		{"two containers, one checkpoint missing: neither restores", []string{"app", "sidecar"},
			func(t *testing.T, dir string) { require.NoError(t, os.RemoveAll(filepath.Join(dir, "app", id))) }, []bool{false, false}, false,
			"missing checkpoint", "app"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, c := range tt.containers {
				writeCheckpoint(t, dir, c, id)
			}
			if tt.damage != nil {
				tt.damage(t, dir)
			}
			plans := PreparePod(dir, id, tt.containers)
			require.Len(t, plans, len(tt.containers))
			for i, p := range plans {
				assert.Equal(t, tt.restore[i], p.Restore, "container %s: %s", tt.containers[i], p.Reason)
				assert.Equal(t, tt.verified, p.ImagesVerified, tt.containers[i])
				assert.Equal(t, filepath.Join(dir, tt.containers[i], id), p.Dir)
				if tt.reason != "" {
					assert.Contains(t, p.Reason, tt.reason, tt.containers[i])
				}
				if tt.failed != "" && tt.containers[i] != tt.failed {
					assert.Contains(t, p.Reason, "container "+tt.failed+" cannot restore", tt.containers[i])
				}
			}
		})
	}
}
