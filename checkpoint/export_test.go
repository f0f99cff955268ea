package checkpoint

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestExport: `stasis checkpoint export` writes the images as the files CRIU wrote, byte for
// byte, after verification, with the agent's key file; another key, a damaged chunk or a
// non-empty output directory fail.
func TestExport(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "tls.key")
	require.NoError(t, os.WriteFile(keyFile, randomHeap(64, 11), 0o600))
	ring, err := KeyRingFromFile(keyFile)
	require.NoError(t, err)
	images := map[string][]byte{"pages-1.img": jsonHeap(3<<20, 1), "core-1.img": []byte("core"), "zero.img": make([]byte, 1<<20)}
	dir := t.TempDir()
	ckpt, err := packCheckpointWith(t, ring, dir, time.Now(), PackOptions{}, images)
	require.NoError(t, err)

	out := filepath.Join(t.TempDir(), "out")
	require.NoError(t, Run(context.Background(), []string{ExportCommand, "--key-file", keyFile, ckpt, out}))
	for name, want := range images {
		got, err := os.ReadFile(filepath.Join(out, name))
		require.NoError(t, err)
		require.Equal(t, want, got, name)
	}
	err = Run(context.Background(), []string{ExportCommand, "--key-file", keyFile, ckpt, out})
	require.ErrorContains(t, err, "not empty")

	otherKey := filepath.Join(t.TempDir(), "other.key")
	require.NoError(t, os.WriteFile(otherKey, randomHeap(64, 12), 0o600))
	err = Run(context.Background(), []string{ExportCommand, "--key-file", otherKey, ckpt, filepath.Join(t.TempDir(), "o")})
	require.ErrorIs(t, err, ErrNotAuthentic)

	m, err := ReadManifest(ckpt)
	require.NoError(t, err)
	c := m.Pack.Images[0].Chunks[0]
	if m.Pack.Images[0].Name != "core-1.img" {
		t.Fatalf("images in order: %v", m.Pack.Images[0].Name)
	}
	f, err := os.OpenFile(filepath.Join(dir, chunksDir, packFile(c.Pack)), os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0xff}, c.Off+c.Stored-1)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	err = Run(context.Background(), []string{ExportCommand, "--key-file", keyFile, ckpt, filepath.Join(t.TempDir(), "o")})
	require.ErrorContains(t, err, "image core-1.img at offset 0")
}
