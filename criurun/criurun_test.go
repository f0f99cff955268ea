package criurun

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConfigFileContent(t *testing.T) {
	tests := []struct {
		in      []string
		want    string
		wantErr string
	}{
		{nil, "", ""},
		{[]string{"--tcp-established", "--ghost-limit=10M"}, "tcp-established\nghost-limit=10M\n", ""},
		{[]string{"--ghost-limit", "10M", "--file-locks"}, "ghost-limit 10M\nfile-locks\n", ""},
		{[]string{"tcp-established"}, "", "expected --name"},
		{[]string{"--x\nexec-cmd"}, "", "line break"},
	}
	for _, tt := range tests {
		got, err := ConfigFileContent(tt.in)
		if tt.wantErr != "" {
			assert.ErrorContains(t, err, tt.wantErr)
			continue
		}
		require.NoError(t, err)
		assert.Equal(t, tt.want, got)
	}
}

func TestRestoreArgs(t *testing.T) {
	o := RestoreOptions{Argv: []string{"/c/criu"}, ImagesDir: "/d/images", LogFile: "/d/r.log", PidFile: "/d/p",
		Unprivileged: true, Inherit: []InheritFD{{Key: "pipe:[1]", Std: 1}, {Key: "pipe:[1]", Std: 2}, {Key: "var/log/x"}}}
	args, files := o.Args()
	assert.Equal(t, []string{"restore", "-D", "/d/images", "--restore-detached", "--manage-cgroups=ignore",
		"--pidfile", "/d/p", "-o", "/d/r.log", "-v4", "--unprivileged",
		"--inherit-fd", "fd[1]:pipe:[1]", "--inherit-fd", "fd[0]:var/log/x"}, args)
	assert.Empty(t, files)
	assert.Equal(t, "4.1.1", FormatVersion(40101))
	assert.Equal(t, []string{"A=1", NoBreakpointsEnv}, Env([]string{"A=1"}))
	assert.Equal(t, []string{"CRIU_FAULT=0"}, Env([]string{"CRIU_FAULT=0"}))
}
