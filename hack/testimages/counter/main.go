// Command counter is the end-to-end tests' application: it prints an incrementing number every
// interval and holds its state only in memory, so a run that continues after a restore (instead of
// starting again at 0) proves that the process itself was checkpointed and restored.
//
// Each line is "<n>" followed by optional fields the tests assert on:
//
//	mem=ok|bad     with --touch-mib: the touched memory still holds the pattern written at start
//	file=ok|...    with --file: the file written at start (in the writable layer) still holds the
//	               token this process keeps in memory
//
// The first line of a fresh start is "start pid=<pid> token=<token>"; a restored process never
// prints it again.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const pageSize = 4096

func main() {
	interval := flag.Duration("interval", 500*time.Millisecond, "time between two numbers")
	to := flag.Int("to", 0, "exit 0 after printing this number (0: count forever)")
	touchMiB := flag.Int("touch-mib", 0, "allocate and touch this many MiB at start, and check them on every line")
	file := flag.String("file", "", "write a random token to this file at start, and check it on every line")
	flag.Parse()

	// A namespace's PID 1 ignores SIGTERM without a handler: exit like an ordinary process would.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	tok := make([]byte, 8)
	if _, err := rand.Read(tok); err != nil {
		fail("token: %v", err)
	}
	token := hex.EncodeToString(tok)
	fmt.Printf("start pid=%d token=%s\n", os.Getpid(), token)

	var mem []byte
	if *touchMiB > 0 {
		mem = make([]byte, *touchMiB<<20)
		for i := 0; i < len(mem); i += pageSize {
			mem[i] = pattern(i)
			mem[i+pageSize-1] = ^pattern(i)
		}
		fmt.Printf("touched %d MiB\n", *touchMiB)
	}
	if *file != "" {
		if err := os.WriteFile(*file, []byte(token), 0o644); err != nil {
			fail("write %s: %v", *file, err)
		}
	}

	t := time.NewTicker(*interval)
	defer t.Stop()
	for n := 0; ; n++ {
		fields := []string{fmt.Sprint(n)}
		if mem != nil {
			fields = append(fields, "mem="+checkMem(mem))
		}
		if *file != "" {
			fields = append(fields, "file="+checkFile(*file, token))
		}
		fmt.Println(strings.Join(fields, " "))
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

func pattern(i int) byte { return byte(i/pageSize*31 + 7) }

// checkMem reads two bytes of every page: cheap, and it touches every page a restore brought back.
func checkMem(mem []byte) string {
	for i := 0; i < len(mem); i += pageSize {
		if mem[i] != pattern(i) || mem[i+pageSize-1] != ^pattern(i) {
			return "bad"
		}
	}
	return "ok"
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
