// Package podtools holds the command Stasis' init-container runs inside a wired pod: `stasis
// tools-install` stages the stasis binary (the launcher) into the tools volume. Nothing else of
// Stasis enters a pod: CRIU and every privileged step stay in the node agent.
package podtools

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"

	"github.com/stasis-k8s/stasis/internal/flagenv"
	"github.com/stasis-k8s/stasis/wiring"
)

// ToolsInstall is `stasis tools-install --dest DIR`: DIR/stasis (this binary, 0755: the launcher
// runs as the app's user, whoever that is).
func ToolsInstall(_ context.Context, args []string) error {
	fs := flag.NewFlagSet(wiring.ToolsInstallSubcommand, flag.ContinueOnError)
	dest := fs.String("dest", wiring.ToolsMount, "directory to fill (the tools volume)")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := copyFile(self, filepath.Join(*dest, path.Base(wiring.Binary)), 0o755); err != nil {
		return fmt.Errorf("tools-install: copying the stasis binary into %s: %w", *dest, err)
	}
	fmt.Fprintf(os.Stderr, "stasis launcher installed in %s\n", *dest)
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}
