package launcher

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

func TestCombineEntrypoint(t *testing.T) {
	tests := []struct {
		name string
		ep   agentapi.Entrypoint
		args []string
		want []string
		err  string
	}{
		{"entrypoint + cmd", agentapi.Entrypoint{Entrypoint: []string{"/app"}, Cmd: []string{"--serve"}}, nil, []string{"/app", "--serve"}, ""},
		{"args replace cmd", agentapi.Entrypoint{Entrypoint: []string{"/app"}, Cmd: []string{"--serve"}}, []string{"--once"}, []string{"/app", "--once"}, ""},
		{"cmd only", agentapi.Entrypoint{Cmd: []string{"sh", "-c", "x"}}, nil, []string{"sh", "-c", "x"}, ""},
		{"args only", agentapi.Entrypoint{}, []string{"/bin/true"}, []string{"/bin/true"}, ""},
		{"nothing", agentapi.Entrypoint{}, nil, nil, "no ENTRYPOINT or CMD"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CombineEntrypoint(tt.ep, tt.args)
			if tt.err != "" {
				assert.ErrorContains(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

// The init's GODEBUG switches never reach the app, whose own GODEBUG is kept.
func TestInitEnvRoundTrip(t *testing.T) {
	for _, env := range [][]string{{"A=1"}, {"A=1", "GODEBUG=http2client=0"}, {"GODEBUG="}} {
		ie := initEnv(env)
		assert.Contains(t, ie[len(ie)-2:], "GODEBUG="+func() string {
			for _, e := range env {
				if len(e) > 8 && e[:8] == "GODEBUG=" {
					return e[8:] + ",containermaxprocs=0,updatemaxprocs=0"
				}
			}
			return "containermaxprocs=0,updatemaxprocs=0"
		}())
		assert.ElementsMatch(t, env, appEnv(ie))
	}
}
