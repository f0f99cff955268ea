// Command netserver is the network test app: it serves its state over TCP and records what
// happens to its connections. Each line a client sends is answered with the process's token (drawn
// at start: a restored server keeps it, a cold-started one draws another) and the number of
// requests served so far. Every connection that ends is logged to LOG (opened for each line, so
// the app holds no file open) with the error the app saw.
//
// With -udpdial it also reports each answer in a datagram on a connected UDP socket (as a
// metrics client does).
//
//	netserver -log LOG [-listen ADDR]... [-udp ADDR]... [-udpdial ADDR]
package main

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"sync/atomic"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

var (
	logPath string
	token   string
	served  atomic.Int64
	report  net.Conn // -udpdial
)

func logf(format string, args ...any) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Fprintf(f, format+"\n", args...)
	f.Close()
}

func main() {
	var tcp, udp list
	flag.StringVar(&logPath, "log", "", "event log")
	flag.Var(&tcp, "listen", "TCP address to serve on (repeatable)")
	flag.Var(&udp, "udp", "UDP address to bind (repeatable; only held)")
	udpDial := flag.String("udpdial", "", "UDP address to report each answer to")
	flag.Parse()
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	token = hex.EncodeToString(b)
	var held []net.PacketConn
	for _, a := range udp {
		pc, err := net.ListenPacket("udp", a)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		held = append(held, pc)
	}
	if *udpDial != "" {
		c, err := net.Dial("udp", *udpDial)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		report = c
	}
	done := make(chan struct{})
	for _, a := range tcp {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go accept(ln)
	}
	logf("ready token=%s", token)
	<-done
	_ = held
}

func accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			logf("accept: %v", err)
			return
		}
		go serve(c)
	}
}

// serve answers each line; an ended connection is logged with what the app saw.
func serve(c net.Conn) {
	defer c.Close()
	peer := c.RemoteAddr().String()
	r := bufio.NewReader(c)
	for {
		if _, err := r.ReadString('\n'); err != nil {
			logf("closed %s: read: %v", peer, err)
			return
		}
		n := served.Add(1)
		if report != nil {
			if _, err := fmt.Fprintf(report, "token=%s served=%d", token, n); err != nil {
				logf("udp report: %v", err)
			}
		}
		if _, err := fmt.Fprintf(c, "token=%s served=%d\n", token, n); err != nil {
			logf("closed %s: write: %v", peer, err)
			return
		}
	}
}
