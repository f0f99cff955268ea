package main

import (
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The Dockerfile (for machines with Docker) and this assembler (what runs here) must describe the
// same images: same CRIU wrapper and package set as hack/criu/install.sh, same paths, users and
// entrypoints.
func TestDockerfileMatches(t *testing.T) {
	df := readFile(t, "../../Dockerfile")
	inst := readFile(t, "../criu/install.sh")

	heredoc := func(text, start string) string {
		i := strings.Index(text, start)
		require.GreaterOrEqual(t, i, 0, "%q not found", start)
		body := text[i+len(start):]
		j := strings.Index(body, "\nEOF\n")
		require.GreaterOrEqual(t, j, 0, "no EOF after %q", start)
		return body[:j]
	}
	assert.Equal(t, heredoc(inst, `cat >"$wrapper" <<'EOF'`), heredoc(df, `COPY --chmod=0755 <<"EOF" /out/criu/criu`),
		"the Dockerfile's CRIU wrapper must be hack/criu/install.sh's")

	m := regexp.MustCompile(`(?s)pkgs=\(([^)]*)\)`).FindStringSubmatch(inst)
	require.Len(t, m, 2)
	want := strings.Fields(m[1])
	m = regexp.MustCompile(`(?s)apt-get download (.*?);`).FindStringSubmatch(df)
	require.Len(t, m, 2)
	var got []string
	for _, f := range strings.Fields(strings.ReplaceAll(m[1], "\\", " ")) {
		got = append(got, strings.SplitN(f, "=", 2)[0])
	}
	sort.Strings(want)
	sort.Strings(got)
	assert.Equal(t, want, got, "the Dockerfile must fetch install.sh's package set")

	for _, s := range []string{
		"/usr/local/bin/stasis",                                // ImageBinary
		"COPY --from=criu /out/criu " + ImageCriu,              // the CRIU bundle
		`ENTRYPOINT ["` + ImageBinary + `"]`,                   // both images
		`CMD ["webhook"]`, `CMD ["agent"]`, "USER 65532:65532", // as webhookImage/agentImage
	} {
		assert.Contains(t, df, s)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return string(b)
}
