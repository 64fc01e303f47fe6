// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama runs it with,
// over the values Ollama's chat endpoint passes (System, Messages with Role and Content, Response).
// Reads {"template": ..., "messages": [{"role": ..., "content": ...}]} on stdin, writes the prompt.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "TEMPLATE does not parse:", err)
		os.Exit(1)
	}
	var system []string
	for _, m := range in.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
	}
	values := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": in.Messages, "Response": ""}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		fmt.Fprintln(os.Stderr, "TEMPLATE does not run:", err)
		os.Exit(1)
	}
}
