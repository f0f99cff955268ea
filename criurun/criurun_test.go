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

func TestVersionHelpers(t *testing.T) {
	assert.Equal(t, "4.1.1", FormatVersion(40101))
	assert.Equal(t, "var/log/app.log", InheritKey("/var/log/app.log"))
}
