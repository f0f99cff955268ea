// Command counter is the end-to-end tests' application: it prints an incrementing number every
// interval and holds its state only in memory, so a run that continues after a restore (instead of
// starting again at 0) proves that the process itself was checkpointed and restored.
//
// Each line is "<n>" followed by optional fields the tests assert on:
//
//	mem=ok|bad     with --touch-mib: the touched memory still holds the pattern written last
//	file=ok|...    with --file: the file written at start (in the writable layer) still holds the
//	               token this process keeps in memory
//	held=ok|...    with --hold: the file it keeps open and appends every number to (a log in the
//	               writable layer) holds exactly the numbers printed so far
//	removed=gone|back  with --remove: the image file it removed at start is still gone
//
// The first line of a fresh start is "start pid=<pid> token=<token>"; a restored process never
// prints it again.
//
// --hostile plays a hostile tenant against the node agent (e2e security scenario): at start it
// plants /etc/criu/default.conf naming itself as CRIU's action-script; run as that script (CRIU
// sets CRTOOLS_SCRIPT_ACTION), it writes HostileMarker with its credentials, and every counter
// prints "HOSTILE MARKER ..." when it finds one. --probe-agent UID asks the agent, on the
// launchers' channel, about another pod and prints the answers ("probe: ..."). --swap and --hunt:
// see hostile.go.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// HostileMarker is where the hostile action-script would leave its trace: the checkpoint volume,
// which the restored pod mounts too.
const HostileMarker = "/stasis/checkpoints/HOSTILE-MARKER"

const pageSize = 4096

func main() {
	if action := os.Getenv("CRTOOLS_SCRIPT_ACTION"); action != "" {
		status, _ := os.ReadFile("/proc/self/status")
		_ = os.WriteFile(HostileMarker, append([]byte("ran as CRIU action-script "+action+"\n"), status...), 0o644)
		return
	}
	interval := flag.Duration("interval", 500*time.Millisecond, "time between two numbers")
	hostile := flag.Bool("hostile", false, "plant a CRIU configuration naming this program as action-script")
	probe := flag.String("probe-agent", "", "ask the agent about the pod with this UID and print the answers")
	swap := flag.String("swap", "", "DIR,FILE,TARGET...: swap DIR, its entries and FILE for symlinks to each TARGET, forever (no counting)")
	swapDelay := flag.Duration("swap-delay", 3*time.Second, "with --swap: wait this long before swapping")
	huntAgents := flag.String("hunt", "", "ADDR,...: look for the agents' key on every route, with the agents at these addresses (\"-\": none)")
	to := flag.Int("to", 0, "exit 0 after printing this number (0: count forever)")
	touchMiB := flag.Int("touch-mib", 0, "allocate and touch this many MiB at start, and check them on every line")
	touchRandom := flag.Bool("touch-random", false, "with --touch-mib: fill the memory with pseudo-random bytes (incompressible, no two chunks alike) around the checked ones")
	touchVary := flag.Bool("touch-vary", false, "with --touch-mib: change the checked bytes of every page on every line (no two checkpoints share a chunk)")
	file := flag.String("file", "", "write a random token to this file at start, and check it on every line")
	hold := flag.String("hold", "", "keep this file open and append every number to it, and check it on every line")
	remove := flag.String("remove", "", "remove this file of the image at start, and check it stays removed")
	oomAt := flag.String("oom-at", "", "N:MARKER: after printing N, unless MARKER exists, create it and allocate memory without bound (an OOM kill, once)")
	flag.Parse()
	if *swap != "" {
		f := strings.Split(*swap, ",")
		if len(f) < 3 {
			fail("--swap: want DIR,FILE,TARGET...")
		}
		swapLoop(f[0], f[1], f[2:], *swapDelay)
	}

	// A namespace's PID 1 ignores SIGTERM without a handler: exit like an ordinary process would.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	tok := make([]byte, 8)
	if _, err := rand.Read(tok); err != nil {
		fail("token: %v", err)
	}
	token := hex.EncodeToString(tok)
	fmt.Printf("start pid=%d token=%s\n", os.Getpid(), token)
	if *hostile {
		plant()
	}
	if *probe != "" {
		probeAgent(*probe)
	}
	if *huntAgents != "" {
		var addrs []string
		for _, a := range strings.Split(*huntAgents, ",") {
			if a != "" && a != "-" {
				addrs = append(addrs, a)
			}
		}
		hunt(addrs)
	}

	var mem []byte
	if *touchMiB > 0 {
		mem = make([]byte, *touchMiB<<20)
		if *touchRandom {
			fillRandom(mem)
		}
		setMem(mem, 0)
		fmt.Printf("touched %d MiB\n", *touchMiB)
	}
	if *file != "" {
		if err := os.WriteFile(*file, []byte(token), 0o644); err != nil {
			fail("write %s: %v", *file, err)
		}
	}
	var held *os.File
	if *hold != "" {
		var err error
		if held, err = os.OpenFile(*hold, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err != nil {
			fail("open %s: %v", *hold, err)
		}
	}
	if *remove != "" {
		if err := os.Remove(*remove); err != nil {
			fail("remove %s: %v", *remove, err)
		}
	}

	t := time.NewTicker(*interval)
	defer t.Stop()
	var gen byte // of the checked bytes (--touch-vary)
	for n := 0; ; n++ {
		if b, err := os.ReadFile(HostileMarker); err == nil {
			fmt.Printf("HOSTILE MARKER %q\n", b)
		}
		fields := []string{fmt.Sprint(n)}
		if mem != nil {
			fields = append(fields, "mem="+checkMem(mem, gen))
			if *touchVary {
				gen = byte(n + 1)
				setMem(mem, gen)
			}
		}
		if *file != "" {
			fields = append(fields, "file="+checkFile(*file, token))
		}
		if held != nil {
			fmt.Fprintf(held, "%d\n", n)
			fields = append(fields, "held="+checkHeld(*hold, n))
		}
		if *remove != "" {
			fields = append(fields, "removed="+checkRemoved(*remove))
		}
		fmt.Println(strings.Join(fields, " "))
		if *oomAt != "" {
			maybeOOM(*oomAt, n)
		}
		if *to > 0 && n >= *to {
			fmt.Println("done")
			return
		}
		select {
		case s := <-sigs:
			fmt.Printf("got %v at %d\n", s, n)
			os.Exit(143)
		case <-t.C:
		}
	}
}

// maybeOOM allocates and touches memory until the kernel kills the process, once per MARKER: the
// container restarted after the kill finds the marker and counts on.
func maybeOOM(spec string, n int) {
	at, marker, ok := strings.Cut(spec, ":")
	if !ok || at != fmt.Sprint(n) {
		return
	}
	if _, err := os.Stat(marker); err == nil {
		return
	}
	if err := os.WriteFile(marker, []byte("oom\n"), 0o644); err != nil {
		fail("--oom-at: %v", err)
	}
	fmt.Println("allocating without bound")
	var hog [][]byte
	for {
		b := make([]byte, 16<<20)
		for i := 0; i < len(b); i += pageSize {
			b[i] = 1
		}
		hog = append(hog, b)
	}
}

func pattern(i int) byte { return byte(i/pageSize*31 + 7) }

// setMem writes the checked bytes of every page (the first and the last) for generation gen.
func setMem(mem []byte, gen byte) {
	for i := 0; i < len(mem); i += pageSize {
		mem[i] = pattern(i) + gen
		mem[i+pageSize-1] = ^(pattern(i) + gen)
	}
}

// fillRandom fills mem with xorshift64* output: fast, and incompressible for a codec.
func fillRandom(mem []byte) {
	x := uint64(time.Now().UnixNano()) | 1
	for i := 0; i+8 <= len(mem); i += 8 {
		x ^= x >> 12
		x ^= x << 25
		x ^= x >> 27
		binary.LittleEndian.PutUint64(mem[i:], x*0x2545F4914F6CDD1D)
	}
}

// checkMem reads two bytes of every page: cheap, and it touches every page a restore brought back.
func checkMem(mem []byte, gen byte) string {
	for i := 0; i < len(mem); i += pageSize {
		if mem[i] != pattern(i)+gen || mem[i+pageSize-1] != ^(pattern(i)+gen) {
			return "bad"
		}
	}
	return "ok"
}

// checkHeld reads back the held file: the numbers 0..n, one per line, nothing lost or repeated.
func checkHeld(path string, n int) string {
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return "missing"
	}
	if err != nil {
		return "error"
	}
	var want strings.Builder
	for i := 0; i <= n; i++ {
		fmt.Fprintf(&want, "%d\n", i)
	}
	if string(b) != want.String() {
		return "changed"
	}
	return "ok"
}

func checkRemoved(path string) string {
	if _, err := os.Lstat(path); os.IsNotExist(err) {
		return "gone"
	}
	return "back"
}

func checkFile(path, token string) string {
	b, err := os.ReadFile(path)
	switch {
	case os.IsNotExist(err):
		return "missing"
	case err != nil:
		return "error"
	case string(b) != token:
		return "changed"
	}
	return "ok"
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "counter: "+format+"\n", args...)
	os.Exit(1)
}

// plant writes what CRIU would read from the container if it were started inside it: its default
// configuration, naming this program as an action-script (run as root at every stage).
func plant() {
	if err := os.MkdirAll("/etc/criu", 0o755); err != nil {
		fail("plant: %v", err)
	}
	self, _ := os.Executable()
	if err := os.WriteFile("/etc/criu/default.conf", []byte("action-script "+self+"\n"), 0o644); err != nil {
		fail("plant: %v", err)
	}
	fmt.Println("planted /etc/criu/default.conf")
}

// probeAgent asks the agent's channel (the abstract socket in this pod's network namespace) about
// another pod: its image's entrypoint and a restore.
func probeAgent(uid string) {
	// No connection may stay open: CRIU refuses to dump a process holding one to a socket outside
	// its tree ("External socket is used").
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", "@stasis-agent")
		}}}
	defer c.CloseIdleConnections()
	show := func(what string, resp *http.Response, err error) {
		if err != nil {
			fmt.Printf("probe: %s: %v\n", what, err)
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("probe: %s: %d %s\n", what, resp.StatusCode, bytes.TrimSpace(b))
	}
	for i := 0; i < 20; i++ { // the agent opens the channel a moment after the pod's sandbox
		if conn, err := net.Dial("unix", "@stasis-agent"); err == nil {
			conn.Close()
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	resp, err := c.Get("http://agent/v1/entrypoint?podUID=" + uid + "&container=counter")
	show("entrypoint", resp, err)
	body := fmt.Sprintf(`{"pod":{"uid":%q},"container":"counter","checkpointID":"20261130T000000.000Z-000000"}`, uid)
	resp, err = c.Post("http://agent/v1/restore", "application/json", strings.NewReader(body))
	show("restore", resp, err)
}
