// Package criurun runs CRIU: the version gate, dumps through go-criu's swrk mode inside a container's
// namespaces, and restores through the CLI. It knows the layout of the CRIU bundle Stasis ships (a
// wrapper `criu` beside `root/`, trixie's criu with its own loader and libraries) so that CRIU can
// be started without a shell and without the libc of whatever image it runs in.
package criurun

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	criu "github.com/checkpoint-restore/go-criu/v7"
)

// MinVersion is the oldest CRIU Stasis runs: bookworm's 3.17 fails on current kernels
// ("vdso: Unexpected rt vDSO area bounds"); 4.x restores nested PID namespaces and timens here.
const MinVersion = 40000

// NoBreakpointsEnv makes CRIU stop tasks at sigreturn by syscall tracing instead of hardware
// breakpoints (CRIU's fault-injection code 130, FI_NO_BREAKPOINTS). Measured here: in a Firecracker VM
// the debug-register breakpoint never fires and every dump hangs for good after "Waiting for N to
// trap" (the tasks stay seized). Syscall tracing works everywhere at a negligible cost.
const NoBreakpointsEnv = "CRIU_FAULT=130"

// Env returns env with NoBreakpointsEnv added unless CRIU_FAULT is already set.
func Env(env []string) []string {
	for _, e := range env {
		if strings.HasPrefix(e, "CRIU_FAULT=") {
			return env
		}
	}
	return append(env, NoBreakpointsEnv)
}

// Bundle paths relative to the directory holding the wrapper.
const (
	bundleLoader  = "root/usr/lib64/ld-linux-x86-64.so.2"
	bundleLibs    = "root/usr/lib/x86_64-linux-gnu"
	bundleLibs2   = "root/lib/x86_64-linux-gnu"
	bundleCriuBin = "root/usr/sbin/criu"
)

// Argv is the command that starts CRIU given its path as seen by the process that will exec it.
// hostPrefix is prepended only to look at the files (e.g. "/proc/<pid>/root" for a path inside a
// container). When criuPath is the wrapper of a Stasis bundle, CRIU is started through the bundled
// loader directly, so no shell (which the container image may lack) is needed.
func Argv(criuPath, hostPrefix string) []string {
	dir := filepath.Dir(criuPath)
	if _, err := os.Stat(filepath.Join(hostPrefix, dir, bundleCriuBin)); err == nil {
		if _, err := os.Stat(filepath.Join(hostPrefix, dir, bundleLoader)); err == nil {
			return []string{
				filepath.Join(dir, bundleLoader),
				"--library-path", filepath.Join(dir, bundleLibs) + ":" + filepath.Join(dir, bundleLibs2),
				filepath.Join(dir, bundleCriuBin),
			}
		}
	}
	return []string{criuPath}
}

// Version asks CRIU (swrk VERSION call) for its version as major*10000+minor*100+sub.
func Version(criuPath string) (int, error) {
	c := criu.MakeCriu()
	c.SetCriuPath(criuPath)
	v, err := c.GetCriuVersion()
	if err != nil {
		return 0, fmt.Errorf("cannot get the CRIU version from %s: %w", criuPath, err)
	}
	return v, nil
}

// CheckVersion refuses CRIU older than MinVersion with a message that says what to do.
func CheckVersion(criuPath string) (int, error) {
	if criuPath == "" {
		return 0, errors.New("no CRIU path given (--criu-path)")
	}
	if _, err := os.Stat(criuPath); err != nil {
		return 0, fmt.Errorf("CRIU not found at %s: install CRIU >= 4.0 (hack/criu/install.sh or the Stasis image): %w", criuPath, err)
	}
	v, err := Version(criuPath)
	if err != nil {
		return 0, err
	}
	if v < MinVersion {
		return v, fmt.Errorf("CRIU %s at %s is too old: Stasis needs CRIU >= 4.0 (3.x fails on current kernels)", FormatVersion(v), criuPath)
	}
	return v, nil
}

// FormatVersion turns 40101 into "4.1.1".
func FormatVersion(v int) string {
	return fmt.Sprintf("%d.%d.%d", v/10000, v/100%100, v%100)
}

// LogTail returns the last lines of a CRIU log worth quoting in an error: the error lines if any
// (CRIU prefixes them with "Error"), else the last n lines.
func LogTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no CRIU log at %s: %v)", path, err)
	}
	var all, errs []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		all = append(all, l)
		if strings.Contains(l, "Error") || strings.Contains(l, "BUG") {
			errs = append(errs, l)
		}
	}
	pick := errs
	if len(pick) == 0 {
		pick = all
	}
	if len(pick) > n {
		pick = pick[len(pick)-n:]
	}
	return strings.Join(pick, "\n")
}

// LogError wraps err with CRIU's log, quoted.
func LogError(op string, err error, logPath string) error {
	return fmt.Errorf("criu %s failed: %w; CRIU log %s:\n%s", op, err, logPath, indent(LogTail(logPath, 12)))
}

func indent(s string) string {
	return "  > " + strings.ReplaceAll(s, "\n", "\n  > ")
}
