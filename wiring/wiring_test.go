package wiring

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLauncherCommandRoundTrip(t *testing.T) {
	tests := map[string]struct {
		command, args []string
		want          Launch
	}{
		"command and args": {
			command: []string{"python", "train.py"}, args: []string{"--epochs", "3"},
			want: Launch{Command: []string{"python", "train.py", "--epochs", "3"}},
		},
		"no command, args only": {
			args: []string{"--epochs", "3"},
			want: Launch{EntrypointFromImage: true, Command: []string{"--epochs", "3"}},
		},
		"no command, no args": {
			want: Launch{EntrypointFromImage: true, Command: []string{}},
		},
		"command that looks like a flag": {
			command: []string{"--", "--entrypoint-from-image"},
			want:    Launch{Command: []string{"--", "--entrypoint-from-image"}},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			// What the kubelet runs: command followed by args.
			argv := append(LauncherCommand(tc.command), tc.args...)
			require.True(t, Wrapped(argv))
			got, err := ParseLauncherArgs(argv[2:])
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestParseLauncherArgsErrors(t *testing.T) {
	_, err := ParseLauncherArgs([]string{"sleep"})
	assert.ErrorContains(t, err, "unknown argument")
	_, err = ParseLauncherArgs(nil)
	assert.ErrorContains(t, err, "missing --")
	_, err = ParseLauncherArgs([]string{"--"})
	assert.ErrorContains(t, err, "no command")
}

func TestCheckpointDir(t *testing.T) {
	assert.Equal(t, "/stasis/checkpoints/job_ns_train_3/main", CheckpointDir("job/ns/train/3", "main"))
	assert.Equal(t, "_..", IdentityDir(".."))
	assert.Equal(t, "a-b", IdentityDir("a b"))
}
