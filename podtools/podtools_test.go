package podtools

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tools-install puts this binary into the tools volume, runnable by any user, and nothing else.
func TestToolsInstall(t *testing.T) {
	dest := t.TempDir()
	require.NoError(t, ToolsInstall(context.Background(), []string{"--dest", dest}))
	entries, err := os.ReadDir(dest)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	fi, err := os.Stat(filepath.Join(dest, "stasis"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), fi.Mode().Perm())
	self, err := os.Executable()
	require.NoError(t, err)
	want, err := os.ReadFile(self)
	require.NoError(t, err)
	got, err := os.ReadFile(filepath.Join(dest, "stasis"))
	require.NoError(t, err)
	assert.Equal(t, want, got)
	// Runnable: the copy is this test binary; -test.list proves it executes.
	out, err := exec.Command(filepath.Join(dest, "stasis"), "-test.list", "TestToolsInstall").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "TestToolsInstall")
}
