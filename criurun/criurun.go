// Package criurun runs CRIU: the version gate, the agent's dumps (CRIU's RPC, swrk mode, from the
// agent's own bundle, inside a container's namespaces: see Bundle and nsjoin.c), and the
// launcher's restores through the CLI.
package criurun

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
)

// MinVersion is the oldest CRIU Stasis runs: 3.17 fails on current kernels ("vdso: Unexpected rt
// vDSO area bounds"), and 4.1 cannot dump any process holding an inet socket on kernels >= 6.16
// ("sockets: Can't get 1:16 opt: Operation not supported": those kernels refuse SO_PASSCRED on
// inet sockets), i.e. every server. 4.2 handles both.
const MinVersion = 40200

// ErrCriuTooOld is the version gate's refusal.
var ErrCriuTooOld = errors.New("CRIU too old: Stasis needs CRIU >= 4.2 (4.1 cannot dump inet sockets on kernels >= 6.16, 3.x fails on current kernels)")

// NoBreakpointsEnv makes CRIU stop tasks at sigreturn by syscall tracing instead of hardware
// breakpoints (CRIU's fault-injection code 130, FI_NO_BREAKPOINTS). Measured here: in a Firecracker VM
// the debug-register breakpoint never fires and every dump hangs for good after "Waiting for N to
// trap" (the tasks stay seized). Syscall tracing works everywhere at a negligible cost.
const NoBreakpointsEnv = "CRIU_FAULT=130"

// Version asks the bundle's CRIU (RPC VERSION) for its version as major*10000+minor*100+sub.
func (b Bundle) Version(ctx context.Context) (int, error) {
	resp, err := b.Run(ctx, &Call{Type: rpc.CriuReqType_VERSION})
	if err != nil {
		return 0, fmt.Errorf("cannot get the CRIU version from %s: %w", b.Dir, err)
	}
	v := resp.GetVersion()
	if v == nil {
		return 0, fmt.Errorf("CRIU at %s did not report a version", b.Dir)
	}
	return int(v.GetMajorNumber())*10000 + int(v.GetMinorNumber())*100 + int(v.GetSublevel()), nil
}

// CheckVersion opens the bundle holding the wrapper criuPath and refuses CRIU older than
// MinVersion (ErrCriuTooOld) with a message that says what to do.
func CheckVersion(criuPath string) (Bundle, int, error) {
	if criuPath == "" {
		return Bundle{}, 0, errors.New("no CRIU path given (--criu-path)")
	}
	b, err := BundleOf(criuPath)
	if err != nil {
		return b, 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v, err := b.Version(ctx)
	if err != nil {
		return b, 0, err
	}
	if v < MinVersion {
		return b, v, fmt.Errorf("%w: %s at %s is %s", ErrCriuTooOld, criuPath, b.Dir, FormatVersion(v))
	}
	return b, v, nil
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
	return LogErrorAt(op, err, logPath, logPath)
}

// LogErrorAt is LogError reading the log at readPath (e.g. a descriptor's /proc/self/fd path)
// and naming it shown (where an operator finds it).
func LogErrorAt(op string, err error, readPath, shown string) error {
	return fmt.Errorf("criu %s failed: %w; CRIU log %s:\n%s", op, err, shown, indent(LogTail(readPath, 12)))
}

func indent(s string) string {
	return "  > " + strings.ReplaceAll(s, "\n", "\n  > ")
}
