package flagenv

import (
	"flag"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParse(t *testing.T) {
	tests := map[string]struct {
		args    []string
		env     map[string]string
		want    int
		wantErr string
	}{
		"default":           {want: 9443},
		"from env":          {env: map[string]string{"STASIS_AGENT_PORT": "1"}, want: 1},
		"flag beats env":    {args: []string{"--agent-port=2"}, env: map[string]string{"STASIS_AGENT_PORT": "1"}, want: 2},
		"bad env names var": {env: map[string]string{"STASIS_AGENT_PORT": "x"}, wantErr: "$STASIS_AGENT_PORT"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			fs := flag.NewFlagSet("x", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			port := fs.Int("agent-port", 9443, "port")
			err := Parse(fs, tc.args)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, *port)
			assert.Contains(t, fs.Lookup("agent-port").Usage, "$STASIS_AGENT_PORT")
		})
	}
}
