// Command counter is the test app: it appends 1, 2, 3, … to a file (kept open, as apps keep their
// logs open) and to stdout, one number per tick. A restored counter continues its sequence; a
// cold-started one begins again at 1. With -touch-mib it first fills that much memory (bench).
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

var ballast []byte

func main() {
	touch := flag.Int("touch-mib", 0, "MiB of memory to fill before counting")
	tick := flag.Duration("tick", 50*time.Millisecond, "time between numbers")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: counter [-touch-mib N] [-tick D] FILE")
		os.Exit(2)
	}
	ballast = make([]byte, *touch<<20)
	for i := range ballast {
		ballast[i] = byte(i*7 + i>>12)
	}
	f, err := os.OpenFile(flag.Arg(0), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for i := 1; ; i++ {
		fmt.Fprintf(f, "%d\n", i)
		fmt.Printf("%d\n", i)
		time.Sleep(*tick)
	}
}
