// Command counter is the test app: it appends 1, 2, 3, … to a file (kept open, as apps keep their
// logs open) and to stdout, one number per tick. A restored counter continues its sequence; a
// cold-started one begins again at 1. With -touch-mib it first fills that much memory (bench);
// with -chdir it creates that directory and works in it; with -map it also writes each number
// into a shared mapping of that file (as POSIX shared memory in /dev/shm is used). On SIGUSR1 it
// checks every byte of its ballast against the pattern it was filled with and prints "ballast ok
// N MiB" or "ballast BAD at OFFSET" (lazy restore: its memory is its own, page by page).
package main

import (
	"crypto/sha256"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"syscall"
	"time"
)

var ballast []byte

func main() {
	touch := flag.Int("touch-mib", 0, "MiB of memory to fill before counting")
	random := flag.Bool("random", false, "fill that memory with random bytes (incompressible) instead of a pattern")
	churn := flag.Bool("churn", false, "with -random: new random bytes at every number (no two checkpoints share a chunk)")
	heap := flag.String("heap", "pattern", "what fills it: pattern (a byte pattern) or json (JSON documents of strings and numbers, as a service's heap holds them)")
	tick := flag.Duration("tick", 50*time.Millisecond, "time between numbers")
	chdir := flag.String("chdir", "", "directory to create (mode 0750) and work in")
	mapped := flag.String("map", "", "file to map shared and write each number into")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: counter [-touch-mib N] [-tick D] FILE")
		os.Exit(2)
	}
	ballast = make([]byte, *touch<<20)
	rng := rand.NewChaCha8([32]byte{1})
	switch {
	case *random:
		_, _ = rng.Read(ballast)
	case *heap == "json":
		jsonHeap = true
		fillJSON(ballast)
	default:
		for i := range ballast {
			ballast[i] = pattern(i)
		}
	}
	ballastSum = sha256.Sum256(ballast)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go func() {
		for range usr1 {
			fmt.Println(checkBallast())
		}
	}()
	if *chdir != "" {
		check(os.MkdirAll(*chdir, 0o750))
		check(os.Chdir(*chdir))
	}
	var shared []byte
	if *mapped != "" {
		shared = mapFile(*mapped)
	}
	f, err := os.OpenFile(flag.Arg(0), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	check(err)
	for i := 1; ; i++ {
		fmt.Fprintf(f, "%d\n", i)
		fmt.Printf("%d\n", i)
		if shared != nil {
			copy(shared, fmt.Sprintf("%-20d", i))
		}
		if *churn {
			_, _ = rng.Read(ballast)
		}
		time.Sleep(*tick)
	}
}

func pattern(i int) byte { return byte(i*7 + i>>12) }

// checkBallast compares a pattern ballast byte by byte (the first wrong byte is reported at once),
// a JSON one with the sha256 taken when it was filled.
func checkBallast() string {
	if !jsonHeap {
		for i, b := range ballast {
			if b != pattern(i) {
				return fmt.Sprintf("ballast BAD at %d", i)
			}
		}
	} else if sha256.Sum256(ballast) != ballastSum {
		return "ballast BAD: sha256 differs from the one taken when it was filled"
	}
	return fmt.Sprintf("ballast ok %d MiB", len(ballast)>>20)
}

var (
	ballastSum [32]byte
	jsonHeap   bool
)

// fillJSON fills b with JSON documents from a fixed seed.
func fillJSON(b []byte) {
	r := rand.New(rand.NewPCG(1, 2))
	words := []string{"order", "customer", "status", "shipped", "pending", "amount", "currency", "EUR", "USD",
		"address", "street", "city", "Berlin", "Paris", "items", "sku", "quantity", "price", "created", "updated"}
	var doc []byte
	for n := 0; n < len(b); {
		w := func() string { return words[r.IntN(len(words))] }
		doc = fmt.Appendf(doc[:0], `{"id":%d,"customer":"%s-%d","status":%q,"amount":%.2f,"note":"%x","tags":[%q,%q]}`+"\n",
			r.Int64(), w(), r.IntN(100000), w(), r.Float64()*1000, r.Uint64(), w(), w())
		n += copy(b[n:], doc)
	}
}

// mapFile maps a new 4 KiB file shared; the file is closed, only the mapping holds it.
func mapFile(p string) []byte {
	m, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
	check(err)
	check(m.Truncate(4096))
	b, err := syscall.Mmap(int(m.Fd()), 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	check(err)
	check(m.Close())
	return b
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
