package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMatrixMarkdownCellsAndFailures(t *testing.T) {
	md := MatrixMarkdown([]MatrixRow{
		{App: "pipeline", Version: "bash | awk", Passed: true, Restored: true, CheckpointBytes: 3 << 20, ImagesBytes: 2 << 20,
			DumpSeconds: 0.17, RestoreSeconds: 0.27, DrainSeconds: 2.66, ReadyAfter: 10.2, Checked: "sum exact"},
		{App: "postgres", Version: "15", Passed: true, KnownLimit: true, DumpSeconds: -1, RestoreSeconds: -1,
			Failure: "CheckpointFailed: `Error (criu/cr-dump.c:478): … SysVIPC …`", Checked: "rows"},
		{App: "pool", Version: "3.11", Restored: true, Failure: "output: last line before 8, first after 0", Checked: "shm"},
	})
	lines := strings.Split(md, "\n")
	require.GreaterOrEqual(t, len(lines), 5)
	// Every table row has the header's number of cells: a pipe inside a cell is escaped.
	cells := func(l string) int { return strings.Count(strings.ReplaceAll(l, `\|`, ""), "|") }
	for _, l := range lines[1:5] {
		assert.Equal(t, cells(lines[0]), cells(l), "row %q", l)
	}
	assert.Contains(t, lines[2], "| passes | 3.0 MiB (images 2.0) | 0.17 s | 0.27 s | 2.66 s | 10.20 s | – | sum exact |")
	assert.Contains(t, lines[3], "| known limit | – | – | – |")
	assert.Contains(t, lines[4], "| restored, check failed |")
	assert.Contains(t, md, "- **postgres**: CheckpointFailed: `Error (criu/cr-dump.c:478)")
	assert.Contains(t, md, "- **pool**: output: last line before 8")
}

func TestUpdateDocReplacesOnlyBetweenMarkers(t *testing.T) {
	f := filepath.Join(t.TempDir(), "compat.md")
	require.NoError(t, os.WriteFile(f, []byte("intro\n"+MatrixBegin+"\nold table\n"+MatrixEnd+"\nafter\n"), 0o644))
	require.NoError(t, UpdateDoc(f, "| new |\n"))
	b, err := os.ReadFile(f)
	require.NoError(t, err)
	assert.Equal(t, "intro\n"+MatrixBegin+"\n| new |\n"+MatrixEnd+"\nafter\n", string(b))

	require.NoError(t, os.WriteFile(f, []byte("no markers\n"), 0o644))
	assert.ErrorContains(t, UpdateDoc(f, "x"), "markers")
}
